"""Helpers shared by the tests (fixtures live in tests/conftest.py): running the CLI, reading run
folders, the op-test device, small routers and layers, the local Slurm cluster, planted secrets, and
reading a W&B offline run file back."""
import glob
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest
import torch

from moe.config import load_config
from moe.metrics import training_env
from moe.nn.moe_layer import MoELayer
from moe.routing import build_router

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = torch.device(os.environ.get("MOE_TEST_DEVICE", "cpu"))
"""The device the op tests run on: MOE_TEST_DEVICE (default cpu; benchmarks/gpu_check.sh sets cuda)."""
TOL = 1e-5
"""Relative L2 tolerance of the parity comparisons."""
# balancing losses of every kind and the aux-loss-free bias (router buffers updated from the step's
# load); grad_clip 1.0 with gradient norms around 2 means clipping acts on every step
BALANCING = ["model.moe.seq_aux_loss_coef=0.01", "model.moe.global_aux_loss_coef=0.01",
             "model.moe.bias_update_rate=0.01"]


# ---- the CLI and run folders
def run_moe(args, cwd, env_extra=None, check=True, timeout=600):
    """Run the `moe` CLI in a fresh process (DeepSpeed's comm state is per process)."""
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


def tiny_run_args(corpus, data_cache, *extra):
    """`moe train` arguments for a debug MoE run that takes a second or two."""
    return ["train", "experiments/debug_moe.yaml", f"data.dataset={corpus}", f"data.cache_dir={data_cache}",
            "train.eval_every=0", "train.eval_batches=1", "train.log_every=1", "logging.wandb.mode=disabled", *extra]


def assert_close(a: dict, b: dict, what: str, tol: float = TOL):
    """Every tensor of `a` equals the same-named one of `b` within a relative L2 error of `tol`."""
    assert set(a) == set(b), (what, sorted(set(a) ^ set(b)))
    for name in a:
        x, y = a[name].double(), b[name].double()
        assert x.shape == y.shape, (what, name, x.shape, y.shape)
        err = float((x - y).norm() / y.norm().clamp_min(1e-30))
        assert err <= tol, f"{what}: {name} differs by {err:.2e} (relative L2)"


# ---- CPU kernels
def assert_cpu_isa_variants_identical(run):
    """run() -> tensors, once with the baseline and once with the AVX2 build of the CPU row kernels:
    the results must be bitwise identical. Skips on a CPU without AVX2 + F16C."""
    import moe._C as C

    start = C.cpu_isa()
    if not (C.set_cpu_isa("avx2") and C.set_cpu_isa("base")):
        C.set_cpu_isa(start)
        pytest.skip("this CPU has no AVX2 + F16C")
    try:
        results = {}
        for isa in ("base", "avx2"):
            assert C.set_cpu_isa(isa) and C.cpu_isa() == isa
            results[isa] = list(run())
        for a, b in zip(results["base"], results["avx2"], strict=True):
            assert torch.equal(a, b)
    finally:
        C.set_cpu_isa(start)


# ---- routers and layers
def moe_cfg(*overrides, num_experts=4):
    return load_config(None, ["model.vocab_size=10", f"model.moe.num_experts={num_experts}", *overrides]).model.moe


def router(*overrides, d=4, num_experts=4):
    return build_router(d, moe_cfg(*overrides, num_experts=num_experts))


def layer(*overrides, d=16, hidden=32, num_experts=4):
    return MoELayer(d, hidden, moe_cfg(*overrides, num_experts=num_experts), 0.02, 0.02)


# ---- the local Slurm cluster (launch/local_cluster.sh), planted secrets, waiting for jobs
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


# ---- W&B offline run files
"""Read back a W&B offline run file (`run-<id>.wandb`) in tests.

The file is a LevelDB-style log (a 7-byte file header, then 32 KiB blocks of records, each with a
7-byte header: crc32, length, type) of serialised `wandb_internal_pb2.Record` protobufs."""
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < 7:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        else:
            break
        rec = pb.Record()
        rec.ParseFromString(pending)
        yield rec


def read_offline_run(run_dir):
    """{'group', 'tags', 'job_type', 'history_keys', 'config_keys', 'step_metrics'} of the newest offline
    W&B run under run_dir; step_metrics maps each define_metric name or glob to its x-axis metric."""
    files = sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb")))
    assert files, f"no offline W&B run under {run_dir}"
    out = {"group": None, "tags": [], "job_type": None, "history_keys": set(), "config_keys": set(),
           "step_metrics": {}}
    for rec in records(files[-1]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(group=rec.run.run_group, tags=list(rec.run.tags), job_type=rec.run.job_type)
            out["config_keys"] |= {i.key for i in rec.run.config.update}
        elif kind == "metric":
            name = rec.metric.name or rec.metric.glob_name
            step = rec.metric.step_metric
            if not step and rec.metric.step_metric_index:
                step = "#" + str(rec.metric.step_metric_index)
            out["step_metrics"].setdefault(name, step)
        elif kind == "history":
            out["history_keys"] |= {i.key or "/".join(i.nested_key) for i in rec.history.item}
    return out
