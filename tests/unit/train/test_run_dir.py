"""moe/train/run_dir.py: which folders a run may use, moving a refused run aside, summary.json."""
import json
import os

import pytest

from moe.config import ConfigError, load_config, to_yaml
from moe.train.run_dir import check_run_dir, config_differences, prepare_run_dir, write_summary
from tests.helpers import ROOT


def _cfg(tmp_path, *overrides):
    return load_config(f"{ROOT}/experiments/debug_moe.yaml", [f"run.root={tmp_path}", *overrides])


def test_extending_or_relogging_a_run_is_the_same_run(tmp_path):
    base = _cfg(tmp_path)
    assert config_differences(base, _cfg(tmp_path, "train.steps=999", "train.log_every=3", "parallel.ep_size=2")) == []
    assert config_differences(base, _cfg(tmp_path, "train.lr=0.5")) == ["train.lr"]


def test_a_different_run_is_refused_without_writing(tmp_path):
    cfg = _cfg(tmp_path)
    run_dir = prepare_run_dir(cfg, is_writer=True)
    before = open(os.path.join(run_dir, "config.yaml")).read()
    with pytest.raises(ConfigError, match="already holds a run with a different config.*train.lr"):
        check_run_dir(_cfg(tmp_path, "train.lr=0.5"))
    assert open(os.path.join(run_dir, "config.yaml")).read() == before
    assert os.listdir(tmp_path) == ["debug_moe"]


def test_overwrite_moves_the_old_run_aside(tmp_path):
    run_dir = prepare_run_dir(_cfg(tmp_path), is_writer=True)
    (tmp_path / "debug_moe" / "marker").write_text("old")
    new = _cfg(tmp_path, "train.lr=0.5", "run.overwrite=true")
    assert prepare_run_dir(new, is_writer=True) == run_dir
    aside = [d for d in os.listdir(tmp_path) if d.startswith("debug_moe.old-")]
    assert len(aside) == 1 and (tmp_path / aside[0] / "marker").read_text() == "old"
    assert open(os.path.join(run_dir, "config.yaml")).read() == to_yaml(new)


def test_summary_is_json_with_nan_as_null_and_only_on_rank_0(tmp_path):
    write_summary(str(tmp_path), {"status": "finished", "val_loss": float("nan")}, rank=1)
    assert not (tmp_path / "summary.json").exists()
    write_summary(str(tmp_path), {"status": "finished", "val_loss": float("nan")}, rank=0)
    assert json.loads((tmp_path / "summary.json").read_text()) == {"status": "finished", "val_loss": None}
