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

import numpy as np
import pytest
import torch

from moe.config import DataConfig, load_config
from moe.data import ByteTokenizer, Tokenizer, TokenDataset, prepare_data, tokenize_file_for_eval
from moe.errors import DataError, MoeError
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
def assert_cpu_isa_variants_identical(run, compare=torch.equal):
    """run() -> tensors, once with the baseline and once with the AVX2 build of the CPU row kernels:
    the results must be bitwise identical (or compare(base, avx2) where a GEMM differs: the AVX2 build's
    fp32 expert GEMM uses FMA, the baseline ATen's). Skips on a CPU without AVX2 + F16C + FMA."""
    import moe._C as C

    start = C.cpu_isa()
    if not (C.set_cpu_isa("avx2") and C.set_cpu_isa("base")):
        C.set_cpu_isa(start)
        pytest.skip("this CPU has no AVX2 + F16C + FMA")
    try:
        results = {}
        for isa in ("base", "avx2"):
            assert C.set_cpu_isa(isa) and C.cpu_isa() == isa
            results[isa] = list(run())
        for a, b in zip(results["base"], results["avx2"], strict=True):
            result = compare(a, b)
            assert result is None or result
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
        if pos + 7 + length > len(data):  # a record still being written
            break
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


def written_records(path, timeout=60.0):
    """The records of the offline W&B file `path` once its run record is in it. `run.finish()` can
    return before wandb's service process has flushed the file (seen on a loaded CI machine: a file
    with no record yet), so this reads again, for up to `timeout` seconds, until the run record is there."""
    deadline = time.monotonic() + timeout
    while True:
        recs = list(records(path))
        if any(r.WhichOneof("record_type") == "run" for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.2)


def read_offline_run(run_dir):
    """{'group', 'tags', 'job_type', 'history_keys', 'config_keys', 'step_metrics'} of the newest offline
    W&B run under run_dir; step_metrics maps each define_metric name or glob to its x-axis metric."""
    files = sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb")))
    assert files, f"no offline W&B run under {run_dir}"
    out = {"group": None, "tags": [], "job_type": None, "history_keys": set(), "config_keys": set(),
           "step_metrics": {}}
    for rec in written_records(files[-1]):
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


# ---- a tiny GPT
def tiny_gpt_config(*overrides):
    """A 2-layer GPT config (d_model 32, 2 heads, vocabulary 97, sequences up to 32, FFN 64) + `overrides`."""
    return load_config(None, ["model.vocab_size=97", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                              "model.max_seq_len=32", "model.ffn_hidden=64", *overrides])


# ---- synthetic run and sweep folders (`moe compare`, `moe report`; no training)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(root, dirname, *, name=None, model_type="dense", steps=40, tokens_per_step=4096,
              flops_per_token=6e8, eval_every=10, moe_layers=(), num_experts=4, loss0=6.0,
              summary=True, summary_drop=(), summary_extra=None, truncate_last=False):
    """A run folder like the trainer writes under pathlib `root`: summary.json + metrics.jsonl (+ config.yaml)."""
    import math
    import zlib

    import numpy as np

    d = root / dirname
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("model:\n  n_layers: 4\n")
    rng = np.random.default_rng(zlib.crc32(dirname.encode()))
    lines = []
    for step in range(1, steps + 1):
        tokens = step * tokens_per_step
        flops = tokens * flops_per_token
        loss = loss0 * math.exp(-step / steps) + 0.05 * rng.standard_normal()
        line = {"step": step, "tokens": tokens, "flops": flops, "loss/train": loss, "lr": 1e-3, "grad_norm": 1.0,
                "speed/tokens_per_s": 50_000 + 100 * step, "speed/mfu": 0.4}
        for layer in moe_layers:
            load = rng.dirichlet(np.ones(num_experts) * 5).tolist()
            line[f"router/layer{layer}/load"] = load
            line[f"router/layer{layer}/max_over_mean"] = max(load) * num_experts
            line[f"router/layer{layer}/dropped_frac"] = 0.0
            line[f"router/layer{layer}/entropy"] = 1.3
            line[f"router/layer{layer}/aux_loss"] = 0.01
            line[f"router/layer{layer}/z_loss"] = 0.001
        lines.append(json.dumps(line))
        if step % eval_every == 0:
            val = loss0 * math.exp(-step / steps) + 0.1
            lines.append(json.dumps({"step": step, "tokens": tokens, "flops": flops, "loss/val": val,
                                     "ppl/val": math.exp(val)}))
    text = "\n".join(lines) + "\n"
    if truncate_last:
        text += json.dumps({"step": steps + 1, "tokens": 1, "flops": 1.0, "loss/train": 1.0})[:17]
    (d / "metrics.jsonl").write_text(text)
    final_val = loss0 * math.exp(-1) + 0.1
    info = {"name": name or dirname, "model_type": model_type, "train_loss": 2.3456,
            "val_loss": round(final_val, 4), "val_ppl": round(math.exp(final_val), 2),
            "tokens": steps * tokens_per_step, "steps": steps, "params_total": 123_456_789,
            "params_active": 45_600_000 if model_type == "moe" else 123_456_789,
            "flops_per_token": flops_per_token, "tokens_per_s": 51_234.0, "wall_s": 3725.0, "status": "finished"}
    info.update(summary_extra or {})
    for key in summary_drop:
        info.pop(key, None)
    if summary:
        (d / "summary.json").write_text(json.dumps(info))
    return d


def write_sweep(root, name, entries, swept_keys):
    """A sweep folder `root/name` with its sweep.json; `entries` are (run name, values, manifest status or None),
    the run folders are left to the caller (write_run into the returned folder)."""
    d = root / name
    d.mkdir(parents=True)
    runs = [{"name": n, "values": v, **({"status": s} if s else {})} for n, v, s in entries]
    (d / "sweep.json").write_text(json.dumps({"name": name, "swept_keys": list(swept_keys), "runs": runs}))
    return d


def table_rows(md: str) -> dict:
    """{first cell: {header: cell}} of the first markdown table in md, plus "__header__": [headers]."""
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    out = {"__header__": header}
    for r in rows[1:]:
        cells = [c.strip() for c in r.strip("|").split("|")]
        out[cells[0]] = dict(zip(header, cells))
    return out


def assert_png(path, min_bytes=5_000):
    """`path` is a PNG file of a plausible size for a figure."""
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC, path
    assert min_bytes < len(data) < 1_000_000, (path, len(data))


# ---- data: small corpora, token streams, one-line DataErrors

DOC_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
             "tau upsilon phi chi psi omega naïve café über straße 東京 😀").split()


def make_doc(i: int, n_words: int = 60) -> str:
    """Document i: a title line, then lines of words (some multi-byte) drawn with seed i."""
    rng = np.random.default_rng(i)
    lines = [" ".join(rng.choice(DOC_WORDS, size=10)) for _ in range(n_words // 10)]
    return f"document {i}\n" + "\n".join(lines) + "\n"


def write_text_folder(folder, n_docs: int = 40) -> dict:
    """n_docs `make_doc` files (doc000.txt, ...) plus one file of an unsupported type; {name: text}."""
    os.makedirs(folder, exist_ok=True)
    docs = {}
    for i in range(n_docs):
        docs[f"doc{i:03d}.txt"] = make_doc(i)
        with open(os.path.join(folder, f"doc{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(docs[f"doc{i:03d}.txt"])
    with open(os.path.join(folder, "ignored.bin"), "wb") as f:  # unsupported extension: skipped
        f.write(b"\x00\x01 not text")
    return docs


def prepare_text_folder(root):
    """(cfg, docs, TokenData) of a 40-document text folder under root, split at val_fraction 0.2."""
    docs = write_text_folder(root / "docs")
    cfg = DataConfig(dataset=str(root / "docs"), cache_dir=str(root / "cache"), val_fraction=0.2)
    return cfg, docs, prepare_data(cfg)


def split_docs(ds: TokenDataset, tok: Tokenizer) -> list:
    """The documents of a token stream (each ends with EOS)."""
    ids = np.asarray(ds.tokens, dtype=np.int64)
    ends = np.flatnonzero(ids == tok.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(ids[s:e].tolist()) for s, e in zip(starts, ends)]


def pattern_dataset(tmp_path, n_bytes: int) -> TokenDataset:
    """A byte-tokenized dataset whose token k is 33 + k % 90 (known, so windows can be checked)."""
    path = tmp_path / "pattern.txt"
    path.write_bytes(bytes(33 + k % 90 for k in range(n_bytes)))
    return tokenize_file_for_eval(str(path), ByteTokenizer(), str(tmp_path / "cache"))


def text_of(i: int) -> str:
    """A one-line document i of 40 words."""
    return f"document {i}: " + " ".join(f"word{(i * 7 + k) % 31}" for k in range(40)) + "\n"


def write_jsonl(path, rows) -> str:
    """A JSON lines file of `rows` (dicts; a str row is written as is, to plant a bad line)."""
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def data_cfg(tmp_path, dataset, **kw) -> DataConfig:
    """A DataConfig for `dataset` with its cache in tmp_path/cache."""
    return DataConfig(dataset=str(dataset), cache_dir=str(tmp_path / "cache"), **kw)


def prepare_fails(cfg: DataConfig, *patterns: str) -> DataError:
    """prepare_data raises a one-line DataError matching every pattern, and writes nothing."""
    with pytest.raises(DataError) as info:
        prepare_data(cfg, is_writer=True)
    message = str(info.value)
    assert isinstance(info.value, MoeError) and "\n" not in message
    for pattern in patterns:
        assert pattern in message, (pattern, message)
    assert not os.path.exists(cfg.cache_dir), os.listdir(cfg.cache_dir)
    return info.value


# ---- config property tests (tests/unit/config)
def listing(folder):
    """Every file and folder under `folder` (a new empty folder counts too)."""
    return sorted(os.path.relpath(os.path.join(d, name), folder)
                  for d, dirs, files in os.walk(folder) for name in dirs + files)


def assert_refused_well(exc, names, secret):
    """One line that names one of `names` (what is at fault) and holds no planted `secret`."""
    message = str(exc)
    assert "\n" not in message, message
    assert any(n in message for n in names), message
    assert secret not in message, message


def check_forward(cfg):
    """A tiny accepted config builds a model whose loss and aux loss are finite on a tiny batch."""
    import dataclasses

    from moe.nn.gpt import GPT

    m = cfg.model
    tiny = (m.d_model <= 128 and m.n_layers <= 4 and m.max_seq_len <= 4096 and m.vocab_size <= 4096
            and m.moe.num_experts <= 16 and m.ffn_hidden <= 1024 and m.moe.expert_hidden <= 1024
            and m.moe.num_shared_experts <= 4)
    if not tiny:
        return
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(m, vocab_size=m.vocab_size or 257))
    x = torch.randint(0, model.cfg.vocab_size, (2, min(8, m.max_seq_len)))
    out = model(x, x)
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss), (out.loss, out.aux_loss)


# ---- one real DeepSpeed engine in a child process; a 1-process gloo group in this one (tests/unit/train)
ENGINE_PRELUDE = '''
import json, os, sys
import torch
from safetensors.torch import save_file
from moe.config import load_config, to_yaml
from moe.data import BatchSampler
from moe.train.build import build_training
from moe.train.step import optimizer_step

OUT, CORPUS, CACHE = sys.argv[1:4]
TINY = ["model.d_model=32", "model.ffn_hidden=64", "model.moe.expert_hidden=32", "train.seq_len=32",
        "logging.wandb.mode=disabled", f"data.dataset={CORPUS}", f"data.cache_dir={CACHE}"]


def config(*overrides, yaml="debug_moe.yaml"):
    return load_config(os.path.join(%(root)r, "experiments", yaml), [*TINY, *overrides])


def sampler_of(setup, cfg):
    return BatchSampler(setup.data.train, cfg.train.seq_len, cfg.train.micro_batch_size, 0, 1, seed=cfg.run.seed)


def step(setup, sampler, **kw):
    return optimizer_step(setup.engine, setup.model, sampler.next_batch, setup.accum, setup.dist_info.device,
                          setup.dtype, **kw)


def dump(name, obj):
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(obj, f, indent=1)


def save_tensors(name, tensors):
    save_file({k: v.detach().float().cpu().contiguous().clone() for k, v in tensors.items()},
              os.path.join(OUT, name + ".safetensors"))
'''


def run_engine_script(out_dir, body: str, corpus: str, data_cache: str, timeout: int = 240) -> str:
    """Run ENGINE_PRELUDE + `body` in a fresh Python process (DeepSpeed and torch.distributed keep
    process-global state): `config(*overrides)` (debug_moe.yaml shrunk, on `corpus`), `sampler_of`,
    `step`, `dump(name, obj)` (OUT/name.json), `save_tensors(name, dict)` (OUT/name.safetensors).
    Returns out_dir (created); fails with the child's output when it exits non-zero."""
    import textwrap

    os.makedirs(out_dir, exist_ok=True)
    script = os.path.join(out_dir, "script.py")
    with open(script, "w") as f:
        f.write(ENGINE_PRELUDE % {"root": ROOT} + "\n" + textwrap.dedent(body))
    env = training_env({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a world of one, on a free port
    proc = subprocess.run([sys.executable, script, str(out_dir), corpus, data_cache], cwd=str(out_dir), env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return str(out_dir)


def single_process_group(tmp_path):
    """A context manager: a 1-process gloo group for code that all-reduces, destroyed on exit (one
    that is already initialised is used as it is and left alone)."""
    import contextlib

    import torch.distributed as dist

    @contextlib.contextmanager
    def group():
        if dist.is_initialized():
            yield
            return
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg-{os.getpid()}-{time.time_ns()}",
                                rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()

    return group()
