import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_moe(args, cwd, env_extra=None, check=True, timeout=600):
    """Run the `moe` CLI in a fresh process (DeepSpeed's comm state is per process)."""
    from moe.metrics import training_env

    env = training_env({"WANDB_MODE": os.environ.get("WANDB_MODE_TEST", "offline"), "PYTHONUNBUFFERED": "1",
                        "OMP_NUM_THREADS": "1"})
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


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """Fake Slurm commands on PATH: sinfo (partitions debug and big, no GPUs), sbatch (job 4242, or
    fails with FAKE_SBATCH_ERROR; calls are appended to <bin>/sbatch.calls) and squeue (prints the
    file <bin>/squeue.out if present: the tasks "still queued")."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text("#!/bin/bash\ncase \"$*\" in *%P*) printf 'debug*\\nbig\\n' ;; "
                                   "*%G*) echo '(null)' ;; esac\n")
    (bin_dir / "sbatch").write_text(
        "#!/bin/bash\necho \"$@\" >> \"$(dirname \"$0\")/sbatch.calls\"\n"
        "if [[ -n ${FAKE_SBATCH_ERROR:-} ]]; then echo \"$FAKE_SBATCH_ERROR\" >&2; exit 1; fi\necho 4242\n")
    (bin_dir / "squeue").write_text("#!/bin/bash\ncat \"$(dirname \"$0\")/squeue.out\" 2>/dev/null || true\n")
    for f in ("sinfo", "sbatch", "squeue"):
        os.chmod(bin_dir / f, 0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """A small local text corpus (the embedded one costs seconds of start-up in every process)."""
    import inspect
    import json as json_mod
    import textwrap

    path = tmp_path_factory.mktemp("text_corpus") / "corpus.txt"
    path.write_text("\n".join(inspect.getsource(m) for m in (json_mod, textwrap, inspect)))
    return str(path)


def tiny_run_args(corpus, data_cache, *extra):
    """`moe train` arguments for a debug MoE run that takes a second or two."""
    return ["train", "experiments/debug_moe.yaml", f"data.dataset={corpus}", f"data.cache_dir={data_cache}",
            "train.eval_every=0", "train.eval_batches=1", "train.log_every=1", "logging.wandb.mode=disabled", *extra]
