"""Tests for moe.analysis.runs: reading one run folder into a RunRecord (synthetic folders, no training)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from moe.analysis.runs import (
    METRICS_FILE,
    STAT_KEYS,
    SUMMARY_FILE,
    ReportError,
    ReportWarning,
    as_number,
    load_run,
)
from moe.errors import MoeError
from tests.helpers import write_run


def test_moe_run_layers_and_expert_load(tmp_path):
    moe = write_run(tmp_path, "moe-8x", model_type="moe", moe_layers=(1, 3), loss0=5.5, flops_per_token=2.5e8)
    run = load_run(str(moe))
    assert run.is_moe and run.moe_layers() == [1, 3]
    steps, load = run.expert_load(3)
    assert load.shape == (40, 4) and steps[0] == 1 and steps[-1] == 40
    np.testing.assert_allclose(load.sum(axis=1), 1.0, atol=1e-9)
    assert len(run.evals) == 4 and len(run.train) == 40


def test_summary_values_and_status(tmp_path):
    run = load_run(str(write_run(tmp_path, "dense", summary_extra={"status": "failed"})))
    assert run.name == "dense" and not run.is_moe and run.status == "failed"
    assert list(run.stats) == [*STAT_KEYS, "status"]
    assert run.stats["params_total"] == 123_456_789 and run.stats["wall_s"] == 3725.0
    assert run.derived == set() and run.warnings == []
    assert run.moe_layers() == [] and run.expert_load(0)[1].shape == (0, 0)


def test_metrics_only_run_fills_from_metrics(tmp_path):
    run_dir = write_run(tmp_path, "no-summary", model_type="moe", moe_layers=(0,), summary=False)
    run = load_run(str(run_dir))
    assert run.name == "no-summary" and run.is_moe and run.summary == {}
    assert run.stats["tokens"] == 40 * 4096 and run.stats["steps"] == 40
    assert run.stats["flops_per_token"] == pytest.approx(6e8)
    assert run.stats["train_loss"] == run.train[-1]["loss/train"]
    assert run.stats["val_loss"] == run.evals[-1]["loss/val"]
    assert run.stats["tokens_per_s"] == 50_000 + 100 * 40
    assert run.stats["params_total"] is None and run.status is None
    assert {"tokens", "steps", "flops_per_token", "val_loss", "model_type"} <= run.derived
    assert any(f"no {SUMMARY_FILE}" in w for w in run.warnings)


def test_dense_type_inferred_without_router_keys(tmp_path):
    run = load_run(str(write_run(tmp_path, "plain", summary=False)))
    assert run.stats["model_type"] == "dense" and "model_type" in run.derived


def test_not_a_run_folder(tmp_path):
    with pytest.raises(ReportError, match="does-not-exist.*no such directory"):
        load_run(str(tmp_path / "does-not-exist"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=f"empty: not a run folder \\(no {SUMMARY_FILE} and no {METRICS_FILE}\\)"):
        load_run(str(tmp_path / "empty"))
    assert issubclass(ReportError, MoeError) and issubclass(ReportError, ValueError)


def test_truncated_and_malformed_lines_are_skipped(tmp_path):
    run_dir = write_run(tmp_path, "crashed", truncate_last=True)
    with pytest.warns(ReportWarning, match="truncated last line"):
        run = load_run(str(run_dir))
    assert len(run.train) == 40 and run.train[-1]["step"] == 40
    text = (run_dir / METRICS_FILE).read_text().splitlines()
    (run_dir / METRICS_FILE).write_text("\n".join(["{oops", '{"no": "step"}', "[1]", *text[:-1]]) + "\n")
    with pytest.warns(ReportWarning) as caught:
        run = load_run(str(run_dir))
    messages = [str(w.message) for w in caught]
    assert any(":1: skipped malformed line" in m for m in messages)
    assert sum("without an integer 'step'" in m for m in messages) == 2
    assert run.warnings == messages and len(run.train) == 40


def test_resumed_run_keeps_the_later_lines(tmp_path):
    d = tmp_path / "resumed"
    d.mkdir()
    lines = [{"step": s, "tokens": s, "loss/train": 1.0} for s in (1, 2, 3)]
    lines += [{"step": s, "tokens": s, "loss/train": 2.0} for s in (2, 3, 4)]
    (d / METRICS_FILE).write_text("".join(json.dumps(l) + "\n" for l in lines))
    with pytest.warns(ReportWarning, match="steps went backwards 1 time"):
        run = load_run(str(d))
    assert [(l["step"], l["loss/train"]) for l in run.train] == [(1, 1.0), (2, 2.0), (3, 2.0), (4, 2.0)]


def test_unreadable_summary_is_ignored(tmp_path):
    d = write_run(tmp_path, "bad-summary")
    (d / SUMMARY_FILE).write_text("[1, 2]")
    with pytest.warns(ReportWarning, match="expected a JSON object, got list"):
        run = load_run(str(d))
    assert run.name == "bad-summary" and run.stats["tokens"] == 40 * 4096 and "tokens" in run.derived
    (d / SUMMARY_FILE).write_text("{")
    with pytest.warns(ReportWarning, match="unreadable"):
        load_run(str(d))


def test_series_and_router_statistics(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    lines = [
        {"step": 1, "tokens": 10, "loss/train": 3.0, "router/layer0/max_over_mean": 1.5,
         "router/layer2/max_over_mean": 2.5, "router/layer0/dropped_frac": 0.1},
        {"step": 2, "tokens": 20, "loss/train": True, "router/layer0/max_over_mean": 1.2},
        {"step": 3, "loss/train": 2.0, "router/layer0/max_over_mean": "x"},
        {"step": 3, "tokens": 30, "flops": 300.0, "loss/val": 2.5},
    ]
    (d / METRICS_FILE).write_text("".join(json.dumps(l) + "\n" for l in lines))
    run = load_run(str(d))
    x, y = run.series("train", "loss/train")
    assert x.tolist() == [10.0] and y.tolist() == [3.0]  # bools and lines without tokens are skipped
    assert [a.tolist() for a in run.series("eval", "loss/val", "flops")] == [[300.0], [2.5]]
    assert run.last_router_mean("/max_over_mean") == pytest.approx(1.2)  # a string is not a number
    assert run.last_router_mean("/dropped_frac") == pytest.approx(0.1)
    assert run.last_router_mean("/entropy") is None
    assert run.router_mean_series("/max_over_mean") == ([10, 20], [2.0, 1.2])


def test_name_falls_back_to_the_folder(tmp_path):
    d = write_run(tmp_path, "folder-name", summary_extra={"name": "  "})
    assert load_run(str(d)).name == "folder-name"
    assert load_run(str(d) + "/").name == "folder-name"


def test_as_number():
    assert as_number(3) == 3.0 and as_number(2.5) == 2.5
    assert as_number(True) is None and as_number("1") is None and as_number(None) is None
    assert math.isnan(as_number(float("nan")))
