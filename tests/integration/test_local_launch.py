"""`moe launch --local` end to end: torchrun here, a stop request checkpoints and exits, the same command
resumes on the uninterrupted curve, and no planted secret is written."""
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.helpers import PLANTED_SECRETS, files_containing, run_moe, train_losses, wait_for_steps


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
    run_moe(["train", *common, "run.name=straight", "logging.wandb.mode=disabled"], cwd=workdir)  # the reference curve only
    stopped, straight = train_losses(workdir / "runs" / "stopped"), train_losses(workdir / "runs" / "straight")
    assert [s for s, _ in stopped] == list(range(1, 81))
    assert stopped == straight
    assert files_containing(str(workdir / "runs" / "stopped"), PLANTED_SECRETS.values()) == {}
