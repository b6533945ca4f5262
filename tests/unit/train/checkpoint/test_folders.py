"""moe/train/checkpoint/folders.py and the choice of the folder to resume from (verify.find_resume)."""
import pytest

from moe.train.checkpoint import folders, loading
def test_latest_ignores_unfinished_temporary_folders(tmp_path):
    d = tmp_path / "checkpoints"
    (d / "step_00000010").mkdir(parents=True)
    (d / ".tmp-step_00000020").mkdir()  # a save that crashed before its rename
    (d / "latest").write_text("step_00000010")
    assert folders.latest_tag(str(d)) == "step_00000010"
    assert folders.list_steps(str(d)) == [10]


def test_latest_pointing_to_missing_folder_is_an_error(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    (d / "latest").write_text("step_00000030")
    with pytest.raises(RuntimeError, match="step_00000030"):
        folders.latest_tag(str(d))


def test_no_checkpoint(tmp_path):
    assert folders.latest_tag(str(tmp_path / "nothing")) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        loading.load_model_weights(str(tmp_path))


def test_prune_keeps_the_newest_and_never_a_newer_folder(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        (d / folders.step_tag(step)).mkdir(parents=True)
    # just wrote step 30 (a resumed run behind an older run's step 40): 40 is newer and stays
    folders.prune(str(d), just_written=30, keep_last=2)
    assert folders.list_steps(str(d)) == [20, 30, 40]


def test_leftovers_of_a_killed_save_are_removed(tmp_path):
    d = tmp_path / "checkpoints"
    (d / ".tmp-step_00000020").mkdir(parents=True)
    (d / "latest.tmp").write_text("step_00000020")
    (d / "step_00000010").mkdir()
    assert sorted(folders.remove_leftovers(str(d))) == [".tmp-step_00000020", "latest.tmp"]
    assert sorted(p.name for p in d.iterdir()) == ["step_00000010"]
