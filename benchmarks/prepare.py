"""`moe data prepare` with 2 workers vs 1, and `datasets.map(..., num_proc=2, batched=True)` with the same
tokenizer, on a generated local corpus; then a prepare killed mid-way and resumed, checked token for token.

    python -m benchmarks.prepare [--mb 200] [--root DIR] [--reps 1] [--json OUT] [--no-kill]

The corpus (`--mb` MB of JSON lines under --root, default a temporary folder under /tmp) is this
Python's standard library source, one record per file, copied until it is large enough (each copy
starts with its own comment line, so no two records are the same). The tokenizer is a 4096-token
byte-level BPE trained on its first 2 MB and used as a pretrained `tokenizer.json` by all three.
Every variant runs in this process after the imports (tokenizer threads off: one core per worker):

- `prepare wN`: moe.data.prepare.prepare(workers=N): read, tokenize, write the shards' .bin/.idx
  files, fsync; its own clock (the manifest's `last_call.seconds`).
- `datasets map`: load_dataset("json") of the same files (Arrow conversion, timed separately) then
  map(encode_batch, batched=True, num_proc=2) to token ids in Arrow (nothing written as .bin).

Wall seconds and CPU seconds (this process and its workers) are reported: on a shared machine the
wall time depends on the other jobs, the CPU time much less.

Kill-and-resume: `moe data prepare --workers 2` in a subprocess, SIGKILLed once a few shards exist,
rerun to completion; its train and val tokens must equal the uninterrupted prepare's exactly.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time

import numpy as np

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before `tokenizers` is imported: one thread per process

from moe.config import DataConfig  # noqa: E402
from moe.data.prepare import prepare  # noqa: E402
from moe.data.prepared import SHARDS_DIR  # noqa: E402
from moe.data.sources import _stdlib_files  # noqa: E402
from moe.data.tokenizers import _train_bpe  # noqa: E402

SHARD_BYTES = 2 << 20  # --shard-mb: many shards per worker, so the workers finish together


def write_corpus(root: str, mb: int) -> str:
    folder = os.path.join(root, "corpus")
    os.makedirs(folder, exist_ok=True)
    texts = []
    for path in _stdlib_files(sysconfig.get_paths()["stdlib"]):
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    size, copy, part = 0, 0, None
    while size < mb << 20:
        if copy % 4 == 0:
            part = open(os.path.join(folder, f"part{copy // 4:03d}.jsonl"), "w", encoding="utf-8")
        for i, text in enumerate(texts):
            line = json.dumps({"text": f"# copy {copy} file {i}\n{text}"}) + "\n"
            part.write(line)
            size += len(line)
            if size >= mb << 20:
                break
        copy += 1
        if copy % 4 == 0:
            part.close()
    part.close()
    return folder


def train_tokenizer(corpus: str, root: str) -> str:
    with open(os.path.join(corpus, "part000.jsonl"), encoding="utf-8") as f:
        sample = [json.loads(line)["text"] for _, line in zip(range(150), f)]
    out = os.path.join(root, "tokenizer")
    _train_bpe(sample, 4096).save(out)
    return os.path.join(out, "tokenizer.json")


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (pool workers): a cost that,
    unlike wall time, the other jobs on a shared machine do not inflate much."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_prepare(cfg, root: str, workers: int) -> dict:
    out = os.path.join(root, f"prepared_w{workers}")
    shutil.rmtree(out, ignore_errors=True)
    cpu0 = cpu_seconds()
    m = prepare(cfg, out, workers=workers, shard_bytes=SHARD_BYTES)
    return {"seconds": m["last_call"]["seconds"], "cpu_seconds": round(cpu_seconds() - cpu0, 2),
            "tokens": m["tokens"], "bytes": m["bytes"], "out": out}


def run_datasets(corpus: str, tokenizer_json: str, workers: int) -> dict:
    import datasets
    from tokenizers import Tokenizer

    datasets.disable_progress_bars()
    cache = tempfile.mkdtemp(prefix="hfcache-", dir=os.path.dirname(corpus))
    files = sorted(os.path.join(corpus, f) for f in os.listdir(corpus))
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache)
    loaded = time.perf_counter() - t0
    tok = Tokenizer.from_file(tokenizer_json)

    def encode(batch):
        return {"ids": [e.ids for e in tok.encode_batch(batch["text"], add_special_tokens=False)]}

    t0, cpu0 = time.perf_counter(), cpu_seconds()
    mapped = ds.map(encode, batched=True, num_proc=workers, remove_columns=["text"])
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    tokens = sum(len(ids) for batch in mapped.iter(batch_size=10000) for ids in batch["ids"]) + len(mapped)
    shutil.rmtree(cache, ignore_errors=True)
    return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 2), "load_seconds": round(loaded, 3),
            "tokens": tokens}


def kill_and_resume(data_yaml: str, root: str, reference: str) -> dict:
    out = os.path.join(root, "killed")
    cmd = [sys.executable, "-m", "moe.cli", "data", "prepare", data_yaml, "--workers", "2", "--out", out,
           "--shard-mb", str(SHARD_BYTES / 2**20), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = os.path.join(out, SHARDS_DIR)
    while proc.poll() is None:
        if os.path.isdir(shards) and len([e for e in os.listdir(shards) if not e.startswith(".")]) >= 4:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = sorted(e for e in os.listdir(shards) if not e.startswith("."))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    equal = all(np.array_equal(_tokens(out, split), _tokens(reference, split)) for split in ("train", "val"))
    return {"shards_before_kill": len(before), "tokens_equal": bool(equal)}


def _tokens(folder: str, split: str) -> np.ndarray:
    names = sorted(os.listdir(os.path.join(folder, SHARDS_DIR)))
    return np.concatenate([np.fromfile(os.path.join(folder, SHARDS_DIR, n, f"{split}.bin"), dtype=np.uint16)
                           for n in names])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=200, help="corpus size in MB (default 200)")
    p.add_argument("--root", default=None, help="scratch folder (default: a new one under /tmp, deleted after)")
    p.add_argument("--reps", type=int, default=1, help="rounds of the three variants (medians reported)")
    p.add_argument("--shard-mb", type=float, default=2.0, help="text per shard in MB (default 2)")
    p.add_argument("--no-kill", action="store_true", help="skip the kill-and-resume check")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    global SHARD_BYTES
    SHARD_BYTES = int(args.shard_mb * 2**20)
    root = args.root or tempfile.mkdtemp(prefix="moe-prepare-bench-", dir="/tmp")
    os.makedirs(root, exist_ok=True)
    try:
        corpus = write_corpus(root, args.mb)
        tok = train_tokenizer(corpus, root)
        cfg = DataConfig(dataset=corpus, tokenizer=tok, cache_dir=os.path.join(root, "cache"))
        load0 = os.getloadavg()[0]
        rounds = {"prepare w1": [], "prepare w2": [], "datasets map w2": []}
        for _ in range(args.reps):
            rounds["prepare w1"].append(run_prepare(cfg, root, 1))
            rounds["prepare w2"].append(run_prepare(cfg, root, 2))
            rounds["datasets map w2"].append(run_datasets(corpus, tok, 2))
        result = {"mb": args.mb, "load_before": load0, "load_after": os.getloadavg()[0], "variants": {}}
        base = float(np.median([r["seconds"] for r in rounds["prepare w1"]]))
        print(f"{args.mb} MB corpus, {SHARD_BYTES / 2**20:g} MB shards, BPE 4096, load average {load0:.1f} before, "
              f"{result['load_after']:.1f} after ({os.cpu_count()} cores)")
        print("| variant | seconds | x prepare w1 | CPU seconds | tokens | M tokens/s |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, runs in rounds.items():
            sec = float(np.median([r["seconds"] for r in runs]))
            cpu = float(np.median([r["cpu_seconds"] for r in runs]))
            tokens = runs[0]["tokens"]
            result["variants"][name] = {"seconds": sec, "cpu_seconds": cpu, "tokens": tokens, "runs": runs}
            print(f"| {name} | {sec:.1f} | {base / sec:.2f} | {cpu:.1f} | {tokens:,} | {tokens / sec / 1e6:.3f} |")
        print(f"(datasets load_dataset, not included above: {rounds['datasets map w2'][0]['load_seconds']:.1f} s)")
        if not args.no_kill:
            data_yaml = os.path.join(root, "data.yaml")
            with open(data_yaml, "w") as f:
                f.write(f"dataset: {corpus}\ntokenizer: {tok}\ncache_dir: {root}/cache\n")
            result["kill_and_resume"] = kill_and_resume(data_yaml, root, rounds["prepare w2"][-1]["out"])
            print(f"kill and resume: {result['kill_and_resume']}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
