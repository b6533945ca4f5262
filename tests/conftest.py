import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_moe(args, cwd, env_extra=None, check=True, timeout=600):
    """Run the `moe` CLI in a fresh process (DeepSpeed's comm state is per process)."""
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE_TEST", "offline"), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "moe.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"moe {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def workdir(tmp_path):
    """A scratch folder with the experiments/ configs and a shared data cache."""
    os.symlink(os.path.join(ROOT, "experiments"), tmp_path / "experiments")
    return tmp_path


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))
