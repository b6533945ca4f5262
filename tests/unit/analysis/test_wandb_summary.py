"""Tests for moe.analysis.wandb_summary (`moe report --wandb`) against a stand-in `wandb` module; the
real offline W&B run is tested in tests/integration/test_sweep.py."""
from __future__ import annotations

import sys
import types

import pytest

from moe.analysis.sweep_report import build_report
from moe.analysis.wandb_summary import TABLE_COLUMNS, log_report
from tests.helpers import write_run, write_sweep


@pytest.fixture
def fake_wandb(monkeypatch):
    """A `wandb` module recording init's arguments and what was logged."""
    calls = {"init": None, "log": [], "finished": False}

    class Run:
        def log(self, data):
            calls["log"].append(data)

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    module = types.SimpleNamespace(init=init, Table=lambda columns, data: ("table", columns, data),
                                   Image=lambda path: ("image", path))
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return calls


def test_log_report_table_and_images(tmp_path, fake_wandb, monkeypatch):
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "report.md").write_text("")
    rows = [{"variant": "k=1", "finished": 1, "val_loss": 2.0, "val_loss_std": 0.0, "tokens_per_s": 10.0,
             "load_max_over_mean": None, "extra": 1}]
    log_report(rows, str(tmp_path), "mysweep")
    assert fake_wandb["init"] == {"project": "moe", "group": "mysweep", "job_type": "report",
                                  "name": "mysweep-report", "dir": str(tmp_path), "mode": "offline"}
    assert fake_wandb["log"][0] == {"report/table": ("table", TABLE_COLUMNS, [["k=1", 1, 2.0, 0.0, 10.0, None]])}
    assert fake_wandb["log"][1:] == [{"report/a": ("image", str(tmp_path / "a.png"))},
                                     {"report/b": ("image", str(tmp_path / "b.png"))}]
    assert fake_wandb["finished"]
    monkeypatch.setenv("WANDB_MODE", "disabled")
    log_report(rows, str(tmp_path), "g")
    assert fake_wandb["init"]["mode"] == "disabled"


def test_build_report_groups_the_summary_run_by_sweep(tmp_path, fake_wandb):
    run = write_run(tmp_path, "plain")
    build_report([str(run)], str(tmp_path / "rep-out"), wandb_summary=True)
    assert fake_wandb["init"]["group"] == "rep-out"  # no sweep folder: the output folder's name
    d = write_sweep(tmp_path, "mysweep", [("a", {"a": 1}, "finished")], swept_keys=["a"])
    write_run(d, "a")
    build_report([str(run), str(d)], str(tmp_path / "rep2"), wandb_summary=True)
    assert fake_wandb["init"]["group"] == "mysweep"
    images = [k for entry in fake_wandb["log"] for k in entry if k != "report/table"]
    assert "report/final_val_loss_by_a" in images and "report/load_balance" in images


def test_no_wandb_without_the_flag(tmp_path, fake_wandb):
    build_report([str(write_run(tmp_path, "plain"))], str(tmp_path / "rep"))
    assert fake_wandb["init"] is None
