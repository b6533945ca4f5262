"""moe/launch/slurm.py: submitting to a fake Slurm (sbatch, scontrol on PATH), and the job side's
requeue. The tests against a real cluster are in tests/integration/test_slurm.py."""
import json
import os

import pytest

from moe.config import ConfigError
from moe.launch import LaunchError, LaunchOptions, launch
from moe.launch.options import resolve_tasks
from moe.launch.slurm import SlurmJob, SlurmLauncher, job_dir_of, sbatch
from tests.helpers import run_moe
from tests.helpers import PLANTED_SECRETS, files_containing

TINY = ["train.steps=3", "train.log_every=1", "train.eval_every=0"]


def opts(**kw):
    base = dict(config="experiments/debug_moe.yaml", overrides=list(TINY), nodes=2, gpus_per_node=1)
    base.update(kw)
    return LaunchOptions(**base)


def test_cli_errors_and_sbatch_errors_are_shown(workdir, fake_slurm):
    env = {"PATH": os.environ["PATH"]}
    proc = run_moe(["launch", "experiments/debug_moe.yaml", *TINY, "--nodes", "0"], cwd=workdir, check=False, env_extra=env)
    assert proc.returncode == 2 and "error: --nodes must be >= 1" in proc.stderr
    env["FAKE_SBATCH_ERROR"] = "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified"
    proc = run_moe(["launch", "experiments/debug_moe.yaml", *TINY, "--nodes", "2", "--account", "nope"], cwd=workdir,
                   check=False, env_extra=env)
    assert proc.returncode == 2
    assert "sbatch failed:\nsbatch: error: Batch job submission failed: Invalid account" in proc.stderr


def test_submission_writes_the_run_folder_and_no_secret(workdir, monkeypatch, capsys, fake_slurm):
    for k, v in PLANTED_SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(workdir)
    assert launch(opts(env=["NCCL_DEBUG=INFO"], cpu=True), ["launch", "..."]) == 0
    out = capsys.readouterr().out
    run = workdir / "runs" / "debug_moe"
    assert "submitted job 4242" in out and "runs/debug_moe/logs/slurm-4242.out" in out
    assert (fake_slurm / "sbatch.calls").read_text().split() == ["--parsable", "runs/debug_moe/submit.sbatch"]
    script = (run / "submit.sbatch").read_text()
    assert os.access(run / "submit.sbatch", os.X_OK) and "export NCCL_DEBUG=INFO" in script
    assert "train.steps=3" not in script  # the job trains the resolved config, not the overrides
    assert "steps: 3" in (run / "config.yaml").read_text()
    (snapshot,) = (run / "code").iterdir()
    commit = (snapshot / "commit.txt").read_text()
    assert "commit: " in commit or "not a git checkout" in commit
    launches = json.loads((run / "launch.json").read_text())["launches"]
    assert launches[-1]["job_id"] == "4242"
    assert files_containing(str(workdir / "runs"), PLANTED_SECRETS.values()) == {}
    # the same command again reuses the folder (same config); another config is refused
    assert launch(opts(cpu=True)) == 0
    with pytest.raises(ConfigError, match="different config"):
        launch(opts(overrides=TINY + ["model.n_layers=3"], cpu=True))


def test_submission_prints_the_job_and_its_logs(workdir, monkeypatch, capsys, fake_slurm):
    monkeypatch.chdir(workdir)
    assert launch(opts(cpu=True), ["launch", "x"]) == 0
    assert capsys.readouterr().out == (
        "submitted job 4242: 2 node(s) x 1 process(es), 1 run(s)\n"
        "  script:     runs/debug_moe/submit.sbatch  (resubmit with: sbatch runs/debug_moe/submit.sbatch)\n"
        "  config:     runs/debug_moe/config.yaml\n"
        "  job log:    runs/debug_moe/logs/slurm-4242.out\n"
        "  rank logs:  runs/debug_moe/logs/4242/restart_<n>\n"
        "  metrics:    runs/debug_moe/metrics.jsonl\n")
    (entry,) = json.loads((workdir / "runs" / "debug_moe" / "launch.json").read_text())["launches"]
    assert entry["command"] == ["moe", "launch", "launch", "x"] and entry["script"] == "runs/debug_moe/submit.sbatch"
    assert entry["configs"] == ["runs/debug_moe/config.yaml"] and entry["options"]["nodes"] == 2
    assert sorted(os.listdir(workdir / "runs" / "debug_moe")) == ["code", "config.yaml", "launch.json", "logs",
                                                                   "submit.sbatch"]


def test_array_job_runs_one_config_per_task(workdir, monkeypatch, capsys, fake_slurm):
    monkeypatch.chdir(workdir)
    assert launch(opts(array="0-2%2", overrides=TINY + ["run.seed={task}"], cpu=True)) == 0
    script = (workdir / "runs" / "debug_moe" / "submit.sbatch").read_text()
    assert "#SBATCH --array=0-2%2" in script and "slurm-%A_%a.out" in script
    for i in range(3):
        assert f"    {i}) export MOE_RUN_DIR=runs/debug_moe_{i} MOE_CONFIG=runs/debug_moe_{i}/config.yaml ;;" in script
        assert f"seed: {i}" in (workdir / "runs" / f"debug_moe_{i}" / "config.yaml").read_text()
    out = capsys.readouterr().out
    assert "  runs:       debug_moe_0, debug_moe_1, debug_moe_2\n" in out
    assert "  job log:    runs/debug_moe/logs/slurm-4242_<task>.out\n" in out
    assert "  rank logs:  runs/<run>/logs/<task's job id>/restart_<n>\n" in out


def test_job_dir_of_an_array_job(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    assert job_dir_of(resolve_tasks(opts(array="3,11"))) == "runs/debug_moe"
    assert job_dir_of(resolve_tasks(opts(overrides=TINY + ["run.name=solo"]))) == "runs/solo"


def test_wait_returns_the_job_outcome(workdir, monkeypatch, capsys, fake_scontrol):
    monkeypatch.chdir(workdir)
    (fake_scontrol / "scontrol.out").write_text("JobId=4242 JobState=FAILED ExitCode=1:0\n")
    assert launch(opts(cpu=True, wait=True)) == 1
    (fake_scontrol / "scontrol.out").write_text("JobId=4242 JobState=COMPLETED ExitCode=0:0\n")
    summary = workdir / "runs" / "debug_moe" / "summary.json"
    summary.write_text(json.dumps({"status": "finished", "steps": 3, "train_loss": 5.0, "val_loss": None}))
    assert launch(opts(cpu=True, wait=True)) == 0
    assert "[moe launch] debug_moe: finished, step 3, train loss 5.0, val loss None" in capsys.readouterr().out
    assert launch(opts(cpu=True, wait=True, dry_run=True)) == 0  # a dry run has no job to wait for


def test_sbatch_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LaunchError, match=r"^sbatch not found: this machine is not a Slurm login node \(try --local N"):
        sbatch("x.sbatch")


def test_requeue_of_the_slurm_job(fake_scontrol, monkeypatch):
    """SlurmJob.resume_later: `scontrol requeue JOB`, and the line training prints (both outcomes)."""
    assert SlurmLauncher.job_control({}) is None and SlurmLauncher.job_control({"SLURM_JOB_ID": ""}) is None
    job = SlurmLauncher.job_control({"SLURM_JOB_ID": "99"})
    assert isinstance(job, SlurmJob) and job.name == "slurm" and job.job_id == "99"
    assert job.resume_later() == "[moe] requeued Slurm job 99"
    monkeypatch.setenv("FAKE_SCONTROL_ERROR", "scontrol: error: Invalid job id specified")
    assert job.resume_later() == "[moe] scontrol requeue 99 failed (exit 1): scontrol: error: Invalid job id specified"
    assert (fake_scontrol / "scontrol.calls").read_text() == "requeue 99\nrequeue 99\n"


def test_a_requeue_answered_while_slurm_ends_the_job(fake_scontrol, monkeypatch):
    """An accepted requeue SIGTERMs every process of the job, scontrol too: its answer still counts
    (CI saw "scontrol requeue failed" on a job that was requeued). A signal it cannot ignore is named."""
    job = SlurmLauncher.job_control({"SLURM_JOB_ID": "99"})
    monkeypatch.setenv("FAKE_SCONTROL_SIGNAL", "TERM")
    assert job.resume_later() == "[moe] requeued Slurm job 99"
    monkeypatch.setenv("FAKE_SCONTROL_SIGNAL", "KILL")
    assert job.resume_later() == "[moe] scontrol requeue 99 ended by SIGKILL before answering (the job is ending)"
