import pytest

from moe.train import checkpoint


def test_latest_ignores_unfinished_temporary_folders(tmp_path):
    d = tmp_path / "checkpoints"
    (d / "step_00000010").mkdir(parents=True)
    (d / ".tmp-step_00000020").mkdir()  # a save that crashed before its rename
    (d / "latest").write_text("step_00000010")
    assert checkpoint.latest_tag(str(d)) == "step_00000010"
    assert checkpoint.list_steps(str(d)) == [10]


def test_latest_pointing_to_missing_folder_is_an_error(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    (d / "latest").write_text("step_00000030")
    with pytest.raises(RuntimeError, match="step_00000030"):
        checkpoint.latest_tag(str(d))


def test_no_checkpoint(tmp_path):
    assert checkpoint.latest_tag(str(tmp_path / "nothing")) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load_model_weights(str(tmp_path))
