"""Helpers for the launcher tests: the local Slurm cluster (launch/local_cluster.sh), fake Slurm
commands for the tests that need none, planted secrets, and waiting for jobs."""
import json
import os
import shutil
import subprocess
import time

import pytest

from tests.conftest import ROOT

LOCAL_SLURM_CONF = os.path.join(os.environ.get("MOE_SLURM_DIR", "/tmp/moe-slurm"), "slurm.conf")

# Fake secrets: none of these values may appear in any file the launcher or the job writes.
PLANTED_SECRETS = {
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",
    "HF_TOKEN": "hf_plantedTokenValue9f8e7d6c5b4a",
    "MOE_TEST_DB_PASSWORD": "planted-password-value-4711",
    "AWS_SECRET_ACCESS_KEY": "plantedAwsSecretAccessKeyValue+42",
}


def slurm_skip_reason():
    """None when sinfo reaches a controller with at least 2 nodes, else why the slurm tests skip."""
    if shutil.which("sinfo") is None:
        return "sinfo not found: Slurm is not installed (launch/local_cluster.sh up installs and starts a local cluster)"
    if "SLURM_CONF" not in os.environ and not os.path.isfile("/etc/slurm/slurm.conf") \
            and os.path.isfile(LOCAL_SLURM_CONF):
        os.environ["SLURM_CONF"] = LOCAL_SLURM_CONF  # the local cluster; jobs inherit it
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: no Slurm controller answers (run launch/local_cluster.sh up)"
    if proc.returncode != 0:
        return f"sinfo cannot reach a Slurm controller ({proc.stderr.strip()[:200]}): run launch/local_cluster.sh up"
    usable = [line for line in proc.stdout.splitlines() if line.split()[-1].rstrip("*~#") in ("idle", "mix", "alloc")]
    if len(usable) < 2:
        return f"the Slurm cluster has {len(usable)} usable node(s), the tests need 2: {proc.stdout.strip()}"
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = slurm_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def module_workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("launch")
    os.symlink(os.path.join(ROOT, "experiments"), path / "experiments")
    return path


def job_state(job_id):
    proc = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True)
    fields = dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)
    return fields


def wait_job(job_id, log_path, timeout=300):
    """Wait for the job to leave the queue; returns its final scontrol fields. Cancels it on timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        fields = job_state(job_id)
        if fields.get("JobState") not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", None):
            return fields
        if not fields:
            return fields
        time.sleep(1)
    subprocess.run(["scancel", str(job_id)])
    raise AssertionError(f"job {job_id} did not finish in {timeout} s:\n{tail(log_path)}")


def tail(path, n=6000):
    try:
        return open(path, errors="replace").read()[-n:]
    except OSError as exc:
        return f"({exc})"


def job_id_from(stdout):
    for line in stdout.splitlines():
        if line.startswith("submitted job "):
            return line.split()[2].rstrip(":")
    raise AssertionError(f"no job id in:\n{stdout}")


def train_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(m["step"], m["loss/train"]) for m in map(json.loads, f) if "loss/train" in m]


def wait_for_steps(run_dir, n, timeout=180, job_log=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if len(train_losses(run_dir)) >= n:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{run_dir}: fewer than {n} steps after {timeout} s:\n{tail(job_log) if job_log else ''}")


def files_containing(root, needles):
    """{path: [needle, ...]} for every file under root whose bytes contain a needle."""
    hits = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            data = open(path, "rb").read()
            found = [n for n in needles if n.encode() in data]
            if found:
                hits[path] = found
    return hits
