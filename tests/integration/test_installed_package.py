"""`moe launch` from an installed (non-editable) package: the job template ships as package data."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_launch_dry_run_from_a_non_editable_install(tmp_path):
    target = tmp_path / "site"
    env = dict(os.environ, MOE_BUILD_EXT="0", PIP_NO_INPUT="1")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), ROOT], check=True, env=env, capture_output=True, timeout=600)
    assert (target / "moe" / "launch" / "job.sbatch").is_file()
    work = tmp_path / "work"
    shutil.copytree(os.path.join(ROOT, "experiments"), work / "experiments")
    env = dict(os.environ, PYTHONPATH=str(target), WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "moe.cli", "launch", "experiments/debug_moe.yaml", "--dry-run",
                           "--nodes", "1", "--gpus-per-node", "1"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("#!/bin/bash") and "#SBATCH --nodes=1" in proc.stdout
    probe = subprocess.run([sys.executable, "-c", "import moe.launch as m; print(m.TEMPLATE)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip().startswith(str(target))  # the installed copy, not the checkout
    assert not (work / "runs").exists()  # a dry run writes nothing
