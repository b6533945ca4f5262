import json
import os

import pytest

from moe.config import ConfigError
from moe.sweep import load_sweep, wandb_sweep_config
from tests.conftest import run_moe
from tests.wandb_offline import read_offline_run


def write(path, text):
    path.write_text(text)
    return str(path)


def test_grid_names_are_deterministic(workdir):
    sweep = load_sweep(str(workdir / "experiments" / "sweeps" / "debug_grid.yaml"), runs_root=str(workdir / "runs"))
    names = [r.name for r in sweep.runs]
    assert names == ["top_k=1,aux_loss_coef=0.0", "top_k=1,aux_loss_coef=0.01",
                     "top_k=2,aux_loss_coef=0.0", "top_k=2,aux_loss_coef=0.01"]
    assert names == [r.name for r in load_sweep(sweep.path, runs_root=str(workdir / "runs")).runs]


def test_variants_and_seeds(workdir):
    path = write(workdir / "s.yaml", "base: experiments/debug_moe.yaml\nvariants:\n"
                 "  - {model.moe.router: topk}\n  - {model.moe.num_experts: 0}\nseeds: [1, 2]\n")
    sweep = load_sweep(path)
    assert len(sweep.runs) == 4
    assert {r.overrides["run.seed"] for r in sweep.runs} == {1, 2}
    assert [r.name for r in sweep.runs] == ["router=topk,seed=1", "router=topk,seed=2",
                                            "num_experts=0,seed=1", "num_experts=0,seed=2"]


@pytest.mark.parametrize("text,match", [
    ("base: experiments/debug_moe.yaml\ngrid:\n  model.moe.topk: [1, 2]\n", r"topk"),
    ("base: experiments/debug_moe.yaml\ngrid:\n  model.moe.top_k: []\n", r"non-empty list"),
    ("base: experiments/debug_moe.yaml\n", r"empty sweep"),
    ("base: experiments/debug_moe.yaml\ngrid:\n  model.moe.top_k: [1, 9]\n", r"top_k=9.*model\.moe\.top_k"),
    ("grid:\n  model.moe.top_k: [1]\n", r"base"),
    ("base: experiments/debug_moe.yaml\ngird: {}\n", r"unknown sweep keys.*gird"),
])
def test_bad_sweeps_fail_before_running(workdir, text, match):
    with pytest.raises(ConfigError, match=match):
        load_sweep(write(workdir / "bad.yaml", text))


def test_wandb_export(workdir):
    sweep = load_sweep(str(workdir / "experiments" / "sweeps" / "debug_grid.yaml"))
    cfg = wandb_sweep_config(sweep)
    assert cfg["method"] == "grid"
    assert cfg["parameters"]["model.moe.top_k"] == {"values": [1, 2]}
    assert "${args_no_hyphens}" in cfg["command"]


@pytest.mark.slow
def test_tiny_sweep_end_to_end_then_report_and_rerun(workdir, data_cache):
    sweep_file = write(workdir / "grid.yaml",
                       "name: tiny\nbase: experiments/debug_moe.yaml\n"
                       f"overrides: [train.steps=4, train.eval_every=0, train.log_every=2, data.cache_dir={data_cache}]\n"
                       "grid:\n  model.moe.top_k: [1, 2]\n  model.moe.aux_loss_coef: [0.0, 0.01]\n")
    out = run_moe(["sweep", sweep_file, "--parallel", "2"], cwd=workdir)
    assert "4 finished, 0 failed" in out.stdout
    root = workdir / "runs" / "tiny"
    manifest = json.loads((root / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["finished"] * 4

    # W&B: group = sweep, tags = swept values, job_type = train
    wb = read_offline_run(root / "top_k=2,aux_loss_coef=0.01")
    assert wb["group"] == "tiny" and wb["job_type"] == "train"
    assert set(wb["tags"]) == {"top_k:2", "aux_loss_coef:0.01"}
    assert {"loss/train", "tokens", "flops", "router/layer0/max_over_mean"} <= wb["history_keys"]

    rep = run_moe(["report", str(root), "--out", str(workdir / "rep")], cwd=workdir)
    md = (workdir / "rep" / "report.md").read_text()
    for name in ("top_k=1, aux_loss_coef=0.0", "top_k=2, aux_loss_coef=0.01"):
        assert name in md
    assert md.count("| 1/1 |") == 4
    for png in ("val_loss_vs_tokens.png", "val_loss_vs_flops.png", "load_balance.png", "tokens_per_s.png",
                "final_val_loss_by_top_k.png", "final_val_loss_by_aux_loss_coef.png", "expert_load.png"):
        assert (workdir / "rep" / png).stat().st_size > 5000, png
    assert "report.md" in rep.stdout

    # a rerun of a finished sweep trains nothing
    mtimes = {p: p.stat().st_mtime for p in root.glob("*/summary.json")}
    again = run_moe(["sweep", sweep_file], cwd=workdir)
    assert again.stdout.count("finished earlier, skipped") == 4
    assert {p: p.stat().st_mtime for p in root.glob("*/summary.json")} == mtimes


@pytest.mark.slow
def test_failed_run_is_reported_not_dropped(workdir, data_cache):
    # a missing data file makes one variant fail at start; the other still runs
    sweep_file = write(workdir / "f.yaml",
                       "name: withfail\nbase: experiments/debug_moe.yaml\n"
                       f"overrides: [train.steps=2, train.eval_every=0, data.cache_dir={data_cache}]\n"
                       "variants:\n  - {model.moe.top_k: 1}\n  - {model.moe.top_k: 2, train.lr: -1.0}\n")
    with pytest.raises(ConfigError, match="train.lr"):  # caught before any run starts
        load_sweep(sweep_file)
    sweep_file = write(workdir / "f2.yaml",
                       "name: withfail\nbase: experiments/debug_moe.yaml\n"
                       f"overrides: [train.steps=2, train.eval_every=0, data.cache_dir={data_cache}]\n"
                       "variants:\n  - {model.moe.top_k: 1}\n  - {model.moe.top_k: 2, data.text_field: nope, "
                       f"data.dataset: {workdir / 'd.jsonl'}}}\n")
    (workdir / "d.jsonl").write_text('{"body": "hello"}\n')
    proc = run_moe(["sweep", sweep_file], cwd=workdir, check=False)
    assert proc.returncode != 0 and "1 finished, 1 failed" in proc.stdout
    rep = run_moe(["report", str(workdir / "runs" / "withfail"), "--out", str(workdir / "rep")], cwd=workdir)
    md = (workdir / "rep" / "report.md").read_text()
    assert "Failed or unfinished runs" in md and "text_field=nope" in md


def test_report_rejects_non_run_folder(workdir):
    (workdir / "empty").mkdir()
    proc = run_moe(["report", str(workdir / "empty"), "--out", str(workdir / "rep")], cwd=workdir, check=False)
    assert proc.returncode != 0 and "empty" in proc.stderr


def test_report_logs_a_wandb_summary_run_in_the_sweep_group(workdir, tmp_path, monkeypatch):
    """The report's W&B summary run joins the sweep's group (read back from the offline run)."""
    import glob

    from moe.sweep_report import build_report
    from tests.wandb_offline import records

    sweep = workdir / "runs" / "mysweep"
    run = sweep / "a=1"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"name": "a=1", "status": "finished", "val_loss": 2.0}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 10, "flops": 1.0, "loss/val": 2.0}) + "\n")
    (sweep / "sweep.json").write_text(json.dumps({"name": "mysweep", "swept_keys": ["a"],
                                                  "runs": [{"name": "a=1", "values": {"a": 1}, "status": "finished"}]}))
    out = tmp_path / "rep"
    monkeypatch.setenv("WANDB_MODE", "offline")
    build_report([str(sweep)], str(out), wandb_summary=True)
    files = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert files
    runs = [r.run for r in records(files[0]) if r.WhichOneof("record_type") == "run"]
    assert runs[0].run_group == "mysweep" and runs[0].job_type == "report"
