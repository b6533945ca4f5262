"""`moe data prepare`: tokenize a corpus once, outside training, with N worker processes.

The corpus is read in order (the same documents and train/val split as a run's own tokenization,
`moe.data.corpus`) and cut into shards of about `shard_bytes` of text. Each shard is tokenized by a
worker into `shards/NNNNN/{train,val}.{bin,idx}` (megatron-core indexed files), written in a temporary
folder, fsynced and renamed into place: a shard folder that exists is complete. A killed prepare
leaves complete shards and at most some temporary folders; running it again removes those and
tokenizes only the missing shards, so the result equals an uninterrupted prepare's token for token.
The manifest (`moe.data.prepared`) is written last.

The shards of the token stream are in corpus order, so a prepared folder holds the same tokens as
the cache a run fills itself (`prepare_data`).
"""
from __future__ import annotations

import collections
import dataclasses
import contextlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from typing import Iterator, List, Optional, Tuple

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe.config import YAML_SUFFIXES, Config, DataConfig, load_config
from moe.data.cache import _hash_key, _megatron_indexed, _slug, _SplitWriter
from moe.data.corpus import _Corpus
from moe.data.dataset import _batched
from moe.data.prepared import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    PLAN_FILE,
    SHARDS_DIR,
    TOKENIZER_DIR,
    is_prepared,
    read_manifest,
)
from moe.data.sources import _resolve_source, check_config
from moe.data.tokenizers import Tokenizer, _tokenizer_spec, build_tokenizer, load_saved_tokenizer
from moe.errors import DataError
from moe.io import atomic_write, fsync_dir, fsync_file


SHARD_BYTES = 16 << 20
"""Text per shard (characters, about bytes): small enough that 2 x workers shards in flight stay
well under a GB of memory, large enough that per-shard overheads do not count."""

_SHARD_META = "counts.json"

_worker_tokenizer: Optional[Tokenizer] = None  # set before the pool forks, or loaded by `_init_worker`


def load_data_config(path: str, overrides: Optional[List[str]] = None) -> DataConfig:
    """The `data` section of a run config, or of a DATA.yaml holding only `data` keys (`dataset:`,
    `tokenizer:`, ...), with dotted overrides (`data.max_bytes=1e6`); checked like a run's."""
    raw = None
    if path.lower().endswith(YAML_SUFFIXES) and os.path.isfile(path):
        with open(path, encoding="utf-8") as f, contextlib.suppress(yaml.YAMLError, OmegaConfBaseException):
            raw = OmegaConf.to_container(OmegaConf.create(f.read()), resolve=False)  # the config loader's YAML
    sections = {f.name for f in dataclasses.fields(Config)} | {"defaults"}
    if isinstance(raw, dict) and raw and not set(raw) & sections:  # a DATA.yaml: its keys are data.<key>
        dotted = [f"data.{k}={json.dumps(v)}" for k, v in raw.items()]
        cfg = load_config(None, dotted + list(overrides or []))
    else:
        cfg = load_config(path, overrides)
    check_config(cfg.data)
    return cfg.data


def default_out(cfg: DataConfig) -> str:
    """`<cache_dir>/prepared/<corpus>-<tokenizer>-<hash>`: one folder per corpus and tokenizer."""
    source = _resolve_source(cfg.dataset, cfg.dataset_config, cfg.text_field)
    corpus = _Corpus(source, cfg.max_bytes, cfg.val_fraction)
    key = _hash_key({"kind": "prepared", "corpus": corpus.key(), "tokenizer": _tokenizer_spec(cfg)})
    tok_name = cfg.tokenizer if cfg.tokenizer in ("bytes", "bpe") else _slug(os.path.basename(cfg.tokenizer))
    return os.path.join(cfg.cache_dir, "prepared", f"{source.slug}-{tok_name}-{key}")


def prepare(cfg: DataConfig, out: str, workers: int = 1, shard_bytes: int = SHARD_BYTES,
            progress: bool = False) -> dict:
    """Tokenize cfg's corpus into the prepared folder `out` (resuming a killed prepare there) and return
    the manifest: counts per split and shard, bytes of text, seconds and tokens/s of this call."""
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    if shard_bytes < 1:
        raise DataError(f"shard size must be >= 1 byte, got {shard_bytes}")
    corpus = _Corpus(_resolve_source(cfg.dataset, cfg.dataset_config, cfg.text_field), cfg.max_bytes,
                     cfg.val_fraction)
    plan = {"version": FORMAT_VERSION, "corpus": corpus.key(), "tokenizer": _tokenizer_spec(cfg),
            "shard_bytes": shard_bytes}
    if is_prepared(out):
        return _already_prepared(out, plan)
    _check_out(out, plan)
    corpus.check()  # a bad corpus fails here, before anything is written
    os.makedirs(out, exist_ok=True)
    with _exclusive(out):
        atomic_write(os.path.join(out, PLAN_FILE), _dumps(plan), secrets=False)
        os.makedirs(os.path.join(out, SHARDS_DIR), exist_ok=True)
        return _prepare_locked(cfg, corpus, out, plan, workers, progress)


def _prepare_locked(cfg: DataConfig, corpus: _Corpus, out: str, plan: dict, workers: int, progress: bool) -> dict:
    shards_dir = os.path.join(out, SHARDS_DIR)
    for entry in os.listdir(shards_dir):  # what killed prepares left; we hold the lock
        if entry.startswith(".tmp-"):
            shutil.rmtree(os.path.join(shards_dir, entry), ignore_errors=True)
    tokenizer = _tokenizer(cfg, corpus, out)
    _megatron_indexed()  # imported (seconds) before the clock starts, and before any worker forks
    t0 = time.perf_counter()  # tokens/s: reading and tokenizing, not training a BPE or imports
    done = {name: _shard_counts(os.path.join(shards_dir, name)) for name in os.listdir(shards_dir)
            if not name.startswith(".")}
    bar = _progress_bar(corpus, progress)
    new_tokens = 0
    with _pool(workers, tokenizer, out) as submit:
        for result in submit(_shard_tasks(corpus, plan["shard_bytes"], set(done), bar)):
            done[result["name"]] = result
            new_tokens += result["train"]["tokens"] + result["val"]["tokens"]
            if bar is not None:
                bar.update(result["chars"])
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    shards = [{"name": name, "train": done[name]["train"], "val": done[name]["val"], "bytes": done[name]["bytes"]}
              for name in sorted(done)]
    manifest = {"version": FORMAT_VERSION, "plan": plan,
                "tokenizer": {"spec": plan["tokenizer"], "fingerprint": tokenizer.fingerprint(),
                              "name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
                "shards": shards, **_totals(shards),
                "last_call": {"workers": workers, "seconds": round(seconds, 3), "new_tokens": new_tokens,
                              "tokens_per_s": round(new_tokens / seconds, 1) if seconds > 0 else 0.0}}
    atomic_write(os.path.join(out, MANIFEST_FILE), _dumps(manifest), secrets=False)
    return manifest


def _already_prepared(out: str, plan: dict) -> dict:
    manifest = read_manifest(out, label="--out")
    if manifest["plan"] != plan:
        raise DataError(f"--out {out}: already holds data prepared with other settings "
                        f"({_differences(manifest['plan'], plan)}); "
                        f"choose another --out or delete the folder")
    manifest["last_call"] = {"workers": 0, "seconds": 0.0, "new_tokens": 0, "tokens_per_s": 0.0}
    return manifest


def _check_out(out: str, plan: dict) -> None:
    """`out` must be new, empty, or a prepare of the same plan in progress (to resume)."""
    if os.path.isfile(out):
        raise DataError(f"--out {out}: is a file; name a new or empty folder")
    plan_path = os.path.join(out, PLAN_FILE)
    if os.path.isfile(plan_path):
        with open(plan_path) as f:
            started = json.load(f)
        if started != plan:
            raise DataError(f"--out {out}: holds an unfinished prepare with other settings "
                            f"({_differences(started, plan)}); choose another --out or delete the folder")
    elif os.path.isdir(out) and [e for e in os.listdir(out) if not e.startswith(".")]:
        raise DataError(f"--out {out}: exists and is not a prepared folder; name a new or empty folder")


def _differences(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "differs in " + ", ".join(keys)


def _tokenizer(cfg: DataConfig, corpus: _Corpus, out: str) -> Tokenizer:
    """The folder's tokenizer: saved before the first shard, loaded again on resume (a BPE is trained
    once, on the train split)."""
    folder = os.path.join(out, TOKENIZER_DIR)
    if os.path.isdir(folder):
        return load_saved_tokenizer(folder)
    tokenizer = build_tokenizer(cfg, train_texts=corpus.train_texts)
    tmp = tempfile.mkdtemp(prefix=".tmp-tokenizer-", dir=out)
    tokenizer.save(tmp)
    for name in os.listdir(tmp):
        fsync_file(os.path.join(tmp, name))
    os.replace(tmp, folder)
    fsync_dir(out)
    return tokenizer


def _shard_tasks(corpus: _Corpus, shard_bytes: int, done: set, bar) -> Iterator[Tuple[str, List[str], List[bool]]]:
    """(shard name, texts, is_val flags) of every shard not yet written, in corpus order."""
    texts: List[str] = []
    flags: List[bool] = []
    size, index = 0, 0

    def task():
        name = f"{index:05d}"
        if name in done:
            if bar is not None:
                bar.update(size)
            return None
        return name, texts, flags

    for text, is_val in corpus.pieces():
        texts.append(text)
        flags.append(is_val)
        size += len(text)
        if size >= shard_bytes:
            t = task()
            if t is not None:
                yield t
            texts, flags, size, index = [], [], 0, index + 1
    if texts:
        t = task()
        if t is not None:
            yield t


def _write_shard(out: str, name: str, texts: List[str], flags: List[bool]) -> dict:
    """Tokenize one shard into a temporary folder and rename it to `shards/<name>`."""
    tokenizer = _worker_tokenizer
    shards_dir = os.path.join(out, SHARDS_DIR)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=shards_dir)
    chars = sum(len(t) for t in texts)
    with _SplitWriter(os.path.join(tmp, "train"), tokenizer) as train, \
            _SplitWriter(os.path.join(tmp, "val"), tokenizer) as val:
        for batch, batch_flags in _batched(zip(texts, flags)):
            for ids, is_val in zip(tokenizer.encode_arrays(batch), batch_flags):
                (val if is_val else train).add(ids)
    counts = {"train": train.stats(), "val": val.stats(),
              "bytes": sum(len(t.encode("utf-8", errors="surrogatepass")) for t in texts)}
    with open(os.path.join(tmp, _SHARD_META), "w") as f:
        f.write(_dumps(counts))
    for file in os.listdir(tmp):
        fsync_file(os.path.join(tmp, file))
    os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a shared dataset must stay readable
    os.replace(tmp, os.path.join(shards_dir, name))
    fsync_dir(shards_dir)
    return {"name": name, **counts, "chars": chars}


def _shard_counts(folder: str) -> dict:
    """The counts of a shard written by an earlier (killed) call."""
    with open(os.path.join(folder, _SHARD_META)) as f:
        return json.load(f)


def _totals(shards: List[dict]) -> dict:
    totals = {split: {k: sum(s[split][k] for s in shards) for k in ("tokens", "documents")}
              for split in ("train", "val")}
    return {**totals, "documents": totals["train"]["documents"] + totals["val"]["documents"],
            "tokens": totals["train"]["tokens"] + totals["val"]["tokens"], "bytes": sum(s["bytes"] for s in shards)}


@contextlib.contextmanager
def _pool(workers: int, tokenizer: Tokenizer, out: str):
    """A function mapping shard tasks to results in order, with at most 2 x workers shards in memory."""
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    if workers == 1:
        yield lambda tasks: (_write_shard(out, *t) for t in tasks)
        return
    # One tokenizer thread per worker: N workers use N cores (set before forking, so `tokenizers`
    # does not warn that it was forked after using its thread pool).
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(os.path.join(out, TOKENIZER_DIR),))

    def submit(tasks):
        pending: collections.deque = collections.deque()
        for t in tasks:
            pending.append(pool.apply_async(_write_shard, (out, *t)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    try:
        yield submit
        pool.close()
    finally:
        pool.terminate()
        pool.join()
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _worker_tokenizer is None:  # a start method that does not fork
        _worker_tokenizer = load_saved_tokenizer(tokenizer_dir)


@contextlib.contextmanager
def _exclusive(out: str):
    from filelock import FileLock, Timeout

    lock = FileLock(os.path.join(out, ".prepare.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise DataError(f"--out {out}: another `moe data prepare` is writing this folder") from None
    try:
        yield
    finally:
        lock.release()


def _progress_bar(corpus: _Corpus, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm  # deferred: only the command line shows a bar

    total = sum(entry[1] for entry in corpus.source.fingerprint.get("files", [])) or None
    if total and corpus.max_bytes > 0:
        total = min(total, corpus.max_bytes)
    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", dynamic_ncols=True, mininterval=1.0)


def _dumps(obj) -> str:
    return json.dumps(obj, indent=2) + "\n"
