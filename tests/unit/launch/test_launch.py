"""`moe launch` without a Slurm cluster: the job script, the run folder, bad input, secrets, --local.

Slurm's commands are replaced by small fakes on PATH where a test needs them; the tests against a real
cluster are in test_slurm.py.
"""
import json
import os
import signal
import subprocess
import sys

import pytest

from moe.config import ConfigError
from moe.launch import LaunchError, LaunchOptions, launch, parse_array_spec, redact, world_info
from tests.helpers import run_moe
from tests.helpers import PLANTED_SECRETS, files_containing, train_losses, wait_for_steps

TINY = ["train.steps=3", "train.log_every=1", "train.eval_every=0"]


def opts(**kw):
    base = dict(config="experiments/debug_moe.yaml", overrides=list(TINY), nodes=2, gpus_per_node=1)
    base.update(kw)
    return LaunchOptions(**base)


def test_array_spec():
    assert parse_array_spec("0-3") == ([0, 1, 2, 3], None)
    assert parse_array_spec("0-6:3%2") == ([0, 3, 6], 2)
    assert parse_array_spec("5,1,8-9") == ([1, 5, 8, 9], None)
    for bad in ("", "a-b", "3-1", "1,1", "0-3%0"):
        with pytest.raises(LaunchError):
            parse_array_spec(bad)


def test_world_info_from_hostfile(tmp_path):
    import base64

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=2\nnode2 slots=2\n")
    assert json.loads(base64.urlsafe_b64decode(world_info(str(hostfile)))) == {"node1": [0, 1], "node2": [0, 1]}


def test_dry_run_prints_the_job_and_writes_nothing(workdir, monkeypatch, capsys, fake_slurm):
    monkeypatch.chdir(workdir)
    assert launch(opts(dry_run=True, max_restarts=2, time="00:30:00", partition="big")) == 0
    script = capsys.readouterr().out
    for needle in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --signal=USR2@120",
                   "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --time=00:30:00",
                   "#SBATCH --partition=big", f"#SBATCH --chdir={workdir}",
                   'MOE_HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
                   "--rdzv-backend=c10d", '--rdzv-endpoint="$MOE_HEAD_ADDR:$MOE_MASTER_PORT"',
                   "MOE_MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))", "export MOE_MAX_RESTARTS=2",
                   "export MOE_CONFIG=runs/debug_moe/config.yaml", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                   "GLOO_SOCKET_IFNAME", "--log-dir=", "--redirects=3 --tee=3", "trap '' USR2"):
        assert needle in script, needle
    assert "--gpus-per-node" not in script.split("set -euo")[0]  # the fake partition has no GPU GRES
    assert not (workdir / "runs").exists()
    assert not (fake_slurm / "sbatch.calls").exists()


def test_bad_input_is_rejected_before_sbatch(workdir, monkeypatch, fake_slurm):
    monkeypatch.chdir(workdir)
    cases = [
        (opts(nodes=0), LaunchError, "--nodes must be >= 1"),
        (opts(gpus_per_node=0), LaunchError, "--gpus-per-node must be >= 1"),
        (opts(partition="nosuch"), LaunchError, "unknown partition; sinfo knows: big, debug"),
        # 4 experts over 4 ranks, but the job has 2 x 1 processes
        (opts(overrides=TINY + ["parallel.ep_size=4"]), ConfigError, "parallel.ep_size (4) must divide the world size 2"),
        (opts(overrides=TINY + ["model.moe.top_k=9"]), ConfigError, "model.moe.top_k"),
        (opts(overrides=TINY + ["train.stepz=1"]), ConfigError, "stepz"),
        (opts(env=["HF_TOKEN=abc"]), LaunchError, "looks like a secret"),
        (opts(array="1-0"), LaunchError, "--array"),
        (opts(launcher="deepspeed", max_restarts=1), LaunchError, "--max-restarts needs --launcher torchrun"),
    ]
    for o, exc, msg in cases:
        with pytest.raises(exc) as info:
            launch(o)
        assert msg in str(info.value), (msg, str(info.value))
    assert not (workdir / "runs").exists()
    assert not (fake_slurm / "sbatch.calls").exists()


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


def test_redact_replaces_secret_values_only():
    env = {"HF_TOKEN": "hf_abcdefgh", "PATH": "/usr/bin", "SHORT_KEY": "abc"}
    assert redact("a hf_abcdefgh /usr/bin abc", env) == "a <redacted> /usr/bin abc"


def test_array_job_runs_one_config_per_task(workdir, monkeypatch, capsys, fake_slurm):
    monkeypatch.chdir(workdir)
    assert launch(opts(array="0-2%2", overrides=TINY + ["run.seed={task}"], cpu=True)) == 0
    script = (workdir / "runs" / "debug_moe" / "submit.sbatch").read_text()
    assert "#SBATCH --array=0-2%2" in script and "slurm-%A_%a.out" in script
    for i in range(3):
        assert f"    {i}) export MOE_RUN_DIR=runs/debug_moe_{i} MOE_CONFIG=runs/debug_moe_{i}/config.yaml ;;" in script
        assert f"seed: {i}" in (workdir / "runs" / f"debug_moe_{i}" / "config.yaml").read_text()


@pytest.mark.slow
def test_local_launch_stops_on_usr2_and_resumes(workdir, data_cache):
    """--local: torchrun --standalone here; USR2 -> checkpoint at a step boundary, exit 0; the same
    command again resumes and the curve equals an uninterrupted run. No secret in any written file."""
    common = ["experiments/debug_moe.yaml", "train.steps=80", "train.log_every=1", "train.eval_every=0",
              "checkpoint.every=0", f"data.cache_dir={data_cache}"]
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **PLANTED_SECRETS)
    cmd = [sys.executable, "-m", "moe.cli", "launch", "--local", "1", *common, "run.name=stopped"]
    dry = subprocess.run(cmd + ["--dry-run"], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0 and "torch.distributed.run --standalone" in dry.stdout
    assert not any(v in dry.stdout + dry.stderr for v in PLANTED_SECRETS.values())

    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_steps(workdir / "runs" / "stopped", 5)
        proc.send_signal(signal.SIGUSR2)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "stopped after step" in out
    summary = json.loads((workdir / "runs" / "stopped" / "summary.json").read_text())
    assert summary["status"] == "preempted" and 5 <= summary["steps"] < 80
    again = run_moe(["launch", "--local", "1", *common, "run.name=stopped"], cwd=workdir, env_extra=PLANTED_SECRETS)
    assert f"resuming from step_{summary['steps']:08d}" in again.stdout
    run_moe(["train", *common, "run.name=straight"], cwd=workdir)
    stopped, straight = train_losses(workdir / "runs" / "stopped"), train_losses(workdir / "runs" / "straight")
    assert [s for s, _ in stopped] == list(range(1, 81))
    assert stopped == straight
    assert files_containing(str(workdir / "runs" / "stopped"), PLANTED_SECRETS.values()) == {}
