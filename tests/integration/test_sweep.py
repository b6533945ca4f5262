"""`moe sweep` end to end: shipped sweeps validate, tiny sweeps train, report and rerun, failed runs are
reported, and `--slurm` against fake Slurm commands. The pure unit tests of moe/tools/sweep.py are in
tests/unit/tools/test_sweep.py."""
import json
import os

import pytest

from moe.config import ConfigError
from moe.tools.sweep import load_sweep
from tests.helpers import ROOT, read_offline_run, run_moe


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "experiments", "sweeps"))))
def test_every_shipped_sweep_validates(workdir, name):
    sweep = load_sweep(str(workdir / "experiments" / "sweeps" / name), runs_root=str(workdir / "runs"))
    assert sweep.runs and len({r.name for r in sweep.runs}) == len(sweep.runs)


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
    # two x axes in the W&B UI: tokens (equal data) and, for the losses, training FLOPs (equal compute)
    assert wb["step_metrics"]["loss/*"] == "tokens" and wb["step_metrics"]["router/*"] == "tokens"
    assert wb["step_metrics"]["loss_vs_flops/*"] == "flops" and "loss_vs_flops/train" in wb["history_keys"]

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
    run_moe(["report", str(workdir / "runs" / "withfail"), "--out", str(workdir / "rep")], cwd=workdir)
    md = (workdir / "rep" / "report.md").read_text()
    assert "Failed or unfinished runs" in md and "text_field=nope" in md


def test_report_rejects_non_run_folder(workdir):
    (workdir / "empty").mkdir()
    proc = run_moe(["report", str(workdir / "empty"), "--out", str(workdir / "rep")], cwd=workdir, check=False)
    assert proc.returncode != 0 and "empty" in proc.stderr


def test_report_logs_a_wandb_summary_run_in_the_sweep_group(workdir, tmp_path, monkeypatch):
    """The report's W&B summary run joins the sweep's group (read back from the offline run)."""
    import glob

    from moe.analysis.sweep_report import build_report
    from tests.helpers import written_records

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
    runs = [r.run for r in written_records(files[0]) if r.WhichOneof("record_type") == "run"]
    assert runs[0].run_group == "mysweep" and runs[0].job_type == "report"


# ------------------------------------------------------------------ moe sweep --slurm (fake Slurm commands)


def sweep_cli(*args):
    from moe.cli import main

    main(["sweep", "experiments/sweeps/debug_grid.yaml", *args])


def test_slurm_submits_one_array_of_the_unfinished_runs(workdir, monkeypatch, fake_slurm, capsys):
    monkeypatch.chdir(workdir)
    root = workdir / "runs" / "debug_grid"
    done = root / "top_k=1,aux_loss_coef=0.0"
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"status": "finished"}))

    sweep_cli("--slurm", "--cpu", "--parallel", "2", "--partition", "big", "--time", "00:10:00")
    calls = (fake_slurm / "sbatch.calls").read_text().splitlines()
    assert calls == ["--parsable runs/debug_grid/submit.sbatch"]
    script = (root / "submit.sbatch").read_text()
    assert "#SBATCH --array=1,2,3%2" in script and "#SBATCH --partition=big" in script
    assert "#SBATCH --job-name=moe-sweep-debug_grid" in script
    assert "0) export" not in script
    for i, name in ((1, "top_k=1,aux_loss_coef=0.01"), (2, "top_k=2,aux_loss_coef=0.0"), (3, "top_k=2,aux_loss_coef=0.01")):
        assert f"    {i}) export MOE_RUN_DIR=runs/debug_grid/{name} MOE_CONFIG=runs/debug_grid/{name}/config.yaml" in script
        cfg = (root / name / "config.yaml").read_text()
        assert "group: debug_grid" in cfg and "progress: false" in cfg
    runs = {r["name"]: r for r in json.loads((root / "sweep.json").read_text())["runs"]}
    assert runs["top_k=1,aux_loss_coef=0.0"]["status"] == "finished"
    assert [(r["status"], r["job_id"], r["task_id"]) for n, r in runs.items() if n != done.name] == \
        [("submitted", "4242", 1), ("submitted", "4242", 2), ("submitted", "4242", 3)]
    assert runs["top_k=2,aux_loss_coef=0.01"]["log"].endswith("logs/slurm-4242_3.out")

    # a rerun leaves the runs Slurm still has queued or running alone: only task 3 is submitted again
    (fake_slurm / "squeue.out").write_text("1 RUNNING\n2 PENDING\n")
    capsys.readouterr()
    sweep_cli("--slurm", "--cpu")
    out = capsys.readouterr().out
    assert "top_k=1,aux_loss_coef=0.01: running in Slurm job 4242_1, skipped" in out
    assert "top_k=2,aux_loss_coef=0.0: pending in Slurm job 4242_2, skipped" in out
    assert "#SBATCH --array=3\n" in (root / "submit.sbatch").read_text()
    assert len((fake_slurm / "sbatch.calls").read_text().splitlines()) == 2

    # and once nothing is left to run, nothing is submitted
    for name in runs:
        (root / name).mkdir(exist_ok=True)
        (root / name / "summary.json").write_text(json.dumps({"status": "finished"}))
    sweep_cli("--slurm", "--cpu")
    assert "nothing to submit" in capsys.readouterr().out
    assert len((fake_slurm / "sbatch.calls").read_text().splitlines()) == 2


def test_slurm_dry_run_writes_nothing(workdir, monkeypatch, fake_slurm, capsys):
    monkeypatch.chdir(workdir)
    sweep_cli("--slurm", "--cpu", "--dry-run")
    assert "#SBATCH --array=0,1,2,3\n" in capsys.readouterr().out
    assert not (workdir / "runs").exists() and not (fake_slurm / "sbatch.calls").exists()


def test_slurm_sweep_bad_input(workdir, monkeypatch, fake_slurm, capsys):
    monkeypatch.chdir(workdir)
    with pytest.raises(SystemExit):  # a job option without --slurm is a mistake, not ignored
        sweep_cli("--nodes", "2", "--partition", "big")
    assert "--nodes, --partition: Slurm job option(s) without --slurm" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep_cli("--slurm", "--cpu", "--partition", "nosuch")
    assert "unknown partition" in capsys.readouterr().err
    # runs are validated for the job's world size: expert parallelism over 2 processes needs 2
    write(workdir / "ep.yaml", "name: ep\nbase: experiments/debug_moe.yaml\noverrides: [parallel.ep_size=2]\n"
                               "grid:\n  model.moe.top_k: [1, 2]\n")
    from moe.cli import main

    with pytest.raises(SystemExit):
        main(["sweep", "ep.yaml", "--slurm", "--cpu"])
    assert "ep_size" in capsys.readouterr().err
    main(["sweep", "ep.yaml", "--slurm", "--cpu", "--nodes", "2", "--dry-run"])
    assert "#SBATCH --nodes=2" in capsys.readouterr().out
    assert not (fake_slurm / "sbatch.calls").exists()


def test_slurm_sweep_whose_runs_do_not_fit_is_refused_before_anything_is_written(workdir, monkeypatch, fake_slurm,
                                                                                  capsys):
    """The same plan check as `moe launch`: each run against --gpu-memory; --force submits anyway."""
    monkeypatch.chdir(workdir)
    write(workdir / "big.yaml", "name: big\nbase: experiments/debug_moe.yaml\n"
                                "overrides: [train.micro_batch_size=64]\ngrid:\n  model.moe.top_k: [1, 2]\n")
    from moe.cli import main

    with pytest.raises(SystemExit):
        main(["sweep", "big.yaml", "--slurm", "--gpu-memory", "2.03GiB"])
    err = capsys.readouterr().err
    assert "error: " in err and "does not fit" in err and "--force submits anyway" in err
    assert not (workdir / "runs").exists() and not (fake_slurm / "sbatch.calls").exists()
    main(["sweep", "big.yaml", "--slurm", "--gpu-memory", "2.03GiB", "--force"])
    assert "[moe plan] does not fit" in capsys.readouterr().out
    assert len((fake_slurm / "sbatch.calls").read_text().splitlines()) == 1
