"""`moe launch` and the quickstart being safe and well-behaved: no secret file in the code snapshot,
a clean stop of `--local` on SIGTERM, live progress from `experiments/quickstart.sh`."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import moe.launch.snapshot
from moe.launch import LaunchOptions, launch, secret_file_reason
from tests.helpers import ROOT
from tests.helpers import files_containing

TINY = ["train.steps=3", "train.log_every=1", "train.eval_every=0"]
# (put together here, so that this file itself does not look like a key to the snapshot)
PRIVATE_KEY = "-----BEGIN OPENSSH " + "PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n" \
              "-----END OPENSSH " + "PRIVATE KEY-----\n"


def train_losses(run_dir):
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return [m for m in map(json.loads, f) if "loss/train" in m]
    except (OSError, ValueError):
        return []


def git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false",
                    *args], cwd=repo, check=True, capture_output=True)


def test_secret_file_names_and_contents():
    for rel in (".env", ".env.local", "prod.env", "config/.npmrc", "id_rsa", "id_ed25519.pub", "server.pem",
                "tls.key", "cert.p12", ".netrc", ".pypirc", ".git-credentials", "credentials.json",
                "db_secret.yaml", "hf_token", "my-token.txt", "service-account-prod.json", ".ssh/config",
                "deploy/secrets/values.yaml"):
        assert secret_file_reason(rel), rel
    for rel in ("notes.txt", "moe/tokenizer.py", "tests/test_tokenize.py", "loss_vs_tokens.png", "keys.py",
                "README.md", "envs.py"):
        assert secret_file_reason(rel, b"print('hello')\n", env={}) is None, rel
    assert "private key" in secret_file_reason("notes.txt", PRIVATE_KEY.encode(), env={})
    assert "access token" in secret_file_reason("notes.txt", b"token = 'hf_" + b"a1" * 17 + b"'\n", env={})
    env = {"MY_SERVICE_PASSWORD": "plantedPassword123", "PATH": "/usr/bin"}
    assert "secret environment variable" in secret_file_reason("run.sh", b"login plantedPassword123\n", env=env)
    assert secret_file_reason("run.sh", b"PATH=/usr/bin\n", env=env) is None


def test_code_snapshot_leaves_secret_files_out(tmp_path, monkeypatch, capsys, fake_slurm):
    """An untracked .env, a key pasted into a text file and a file holding a secret env var's value
    stay out of the snapshot (named in left_out.txt and on stderr); other untracked files are in."""
    repo = tmp_path / "src"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "train.py").write_text("print('v1')\n")
    git(repo, "add", "train.py")
    git(repo, "commit", "-q", "-m", "init")
    (repo / "train.py").write_text("print('v2')\n")
    (repo / ".env").write_text("HF_TOKEN=hf_abcdef123456\n")
    (repo / "notes.txt").write_text("try a lower learning rate\n")
    (repo / "server.txt").write_text(PRIVATE_KEY)
    (repo / "login.txt").write_text("the db password is plantedDbPassword4711\n")
    monkeypatch.setenv("MOE_TEST_DB_PASSWORD", "plantedDbPassword4711")
    monkeypatch.setattr(moe.launch.snapshot, "ROOT", str(repo))  # the checkout the snapshot is of
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(os.path.join(ROOT, "experiments"), work / "experiments")
    monkeypatch.chdir(work)

    opts = LaunchOptions(config="experiments/debug_moe.yaml", overrides=list(TINY), nodes=1, cpu=True)
    assert launch(opts) == 0
    err = capsys.readouterr().err
    (snapshot,) = (work / "runs" / "debug_moe" / "code").iterdir()
    diff = (snapshot / "uncommitted.diff").read_text()
    assert "+print('v2')" in diff  # the tracked change
    assert "+++ b/notes.txt" in diff and "+try a lower learning rate" in diff
    for name in (".env", "server.txt", "login.txt"):
        assert f"b/{name}" not in diff, name
    left_out = (snapshot / "left_out.txt").read_text()
    assert ".env: its name looks like a secret's" in left_out
    assert "server.txt: it holds a private key" in left_out
    assert "login.txt: it contains the value of a secret environment variable" in left_out
    assert "notes.txt" not in left_out
    assert "left out 3 untracked file(s) that look like secrets: .env, login.txt, server.txt" in err
    assert "left_out.txt" in (snapshot / "commit.txt").read_text()
    needles = ["hf_abcdef123456", "plantedDbPassword4711", "PRIVATE" + " KEY"]
    assert files_containing(str(work / "runs"), needles) == {}


@pytest.mark.slow
def test_local_launch_stops_cleanly_on_sigterm(workdir, data_cache):
    """SIGTERM to `moe launch --local 1`: the trainer saves a checkpoint and stops, the launcher exits
    0 without a traceback (torchrun itself is never signalled)."""
    run = workdir / "runs" / "termed"
    cmd = [sys.executable, "-m", "moe.cli", "launch", "--local", "1", "experiments/debug_moe.yaml",
           "train.steps=100000", "train.log_every=1", "train.eval_every=0", "checkpoint.every=0",
           f"data.cache_dir={data_cache}", "run.name=termed"]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(workdir / "out.txt", "w") as out, open(workdir / "err.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=err)
        try:
            deadline = time.time() + 120
            while not train_losses(run) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            assert proc.poll() is None and train_losses(run), (workdir / "err.txt").read_text()[-5000:]
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            proc.kill()
    stdout, stderr = (workdir / "out.txt").read_text(), (workdir / "err.txt").read_text()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-8000:]
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr[-5000:]
    assert "stopped after step" in stdout and "checkpoint saved" in stdout
    assert json.loads((run / "summary.json").read_text())["status"] == "preempted"
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / tag).is_dir()


FAKE_MOE = r"""#!/bin/bash
# A stand-in for `moe` in experiments/quickstart.sh: `train` prints DeepSpeed's notes on stdout and a
# tqdm-like bar on stderr (carriage returns, no newline), logs metrics, and ends when $GO exists.
cmd=$1; shift
case $cmd in
  train)
    name=$(basename "$1" .yaml)
    mkdir -p runs/$name
    printf 'train:\n  steps: 50\n  warmup_steps: 5\n' > runs/$name/config.yaml
    echo "[2026-01-01 00:00:00,000] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU."
    echo "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"
    echo "[moe] run $name"
    : > runs/$name/metrics.jsonl
    for step in 1 2 3 4 5 6 7 8 9 10; do
      printf '\r%s:  %d%%|' "$name" $((step * 2)) >&2
      echo "{\"step\": $step, \"tokens\": 2048, \"loss/train\": 5.123456}" >> runs/$name/metrics.jsonl
      sleep 0.1
    done
    for _ in $(seq 300); do [ -e "$GO" ] && break; sleep 0.1; done
    printf '\r%s: 100%%|\n' "$name" >&2
    echo "[moe] $name: train loss 5.1"
    ;;
  compare) echo "compared $*" ;;
  generate) echo "sampled $1" ;;
esac
"""


def test_quickstart_shows_live_progress_of_both_runs(tmp_path):
    """experiments/quickstart.sh with a fake `moe`: while both runs are still going, the MoE run's
    carriage-return progress updates and the dense run's step both reach the output; DeepSpeed's
    notes on stdout do not."""
    (tmp_path / "experiments").mkdir()
    shutil.copy(os.path.join(ROOT, "experiments", "quickstart.sh"), tmp_path / "experiments")
    fake = tmp_path / "fake_moe"
    fake.write_text(FAKE_MOE)
    fake.chmod(0o755)
    go = tmp_path / "go"
    env = dict(os.environ, MOE=str(fake), GO=str(go), QUICKSTART_PROGRESS_S="0.2")
    proc = subprocess.Popen(["bash", str(tmp_path / "experiments" / "quickstart.sh")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(proc.stdout.fileno(), 4096), b"")),
                              daemon=True)
    reader.start()
    try:
        deadline = time.time() + 15
        while time.time() < deadline:
            seen = b"".join(chunks).decode()
            if "\rquickstart_moe:  20%|" in seen and "[dense] step 10/50, train loss 5.1234" in seen:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"no live progress from both runs while they ran:\n{b''.join(chunks)!r}")
        assert not go.exists()  # both runs were still going
        go.touch()
        assert proc.wait(timeout=20) == 0
        reader.join(timeout=10)
    finally:
        go.touch()
        proc.kill()
    out = b"".join(chunks).decode()
    assert "real_accelerator" not in out and "shm_comm_op" not in out
    assert "[moe] quickstart_moe: train loss 5.1" in out and "[moe] quickstart_dense: train loss 5.1" in out
    assert "compared runs/quickstart_dense runs/quickstart_moe" in out and "sampled runs/quickstart_moe" in out
