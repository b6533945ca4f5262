"""moe/launch/run_folder.py: the config and launch.json every launcher writes into a run folder."""
import json
import os

from moe.config import load_config
from moe.launch.options import Task
from moe.launch.run_folder import prepare_run_dirs, record_launch, write
from tests.helpers import ROOT


def test_launches_are_appended_to_launch_json(tmp_path):
    record_launch(str(tmp_path), {"job_id": "1"})
    record_launch(str(tmp_path), {"job_id": "2"})
    assert json.loads((tmp_path / "launch.json").read_text()) == {"launches": [{"job_id": "1"}, {"job_id": "2"}]}
    for garbage in ("not json", "[1, 2]"):  # unreadable: the history starts over
        (tmp_path / "launch.json").write_text(garbage)
        record_launch(str(tmp_path), {"job_id": "3"})
        assert json.loads((tmp_path / "launch.json").read_text()) == {"launches": [{"job_id": "3"}]}
    assert (tmp_path / "launch.json").read_text().endswith("}\n")


def test_prepare_run_dirs_writes_each_resolved_config(tmp_path):
    config = os.path.join(ROOT, "experiments", "debug_moe.yaml")
    tasks = [Task(load_config(config, [f"run.root={tmp_path}", f"run.name=r{i}", f"run.seed={i}"]), i)
             for i in range(2)]
    prepare_run_dirs(tasks)
    for i in range(2):
        assert f"seed: {i}" in (tmp_path / f"r{i}" / "config.yaml").read_text()


def test_write_redacts_and_sets_the_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_TEST_API_TOKEN", "plantedToken12345")
    path = tmp_path / "sub" / "script.sh"
    write(str(path), "echo plantedToken12345\n", mode=0o755)
    assert path.read_text() == "echo <redacted>\n"
    assert os.stat(path).st_mode & 0o777 == 0o755
    write(str(tmp_path / "plain.txt"), "x\n")
    assert os.stat(tmp_path / "plain.txt").st_mode & 0o777 == 0o644
