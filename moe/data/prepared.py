"""Prepared datasets: the folder `moe data prepare` writes, and what a training run checks before reading it.

A prepared folder holds the tokenizer its tokens were made with (`tokenizer/`), one sub-folder per
shard (`shards/00000/`, each a train and a val megatron-core indexed file pair, `.bin` + `.idx`) and,
written last, the manifest `moe_prepared.json`: the corpus and tokenizer it was made from, the
tokenizer's fingerprint and every shard's counts. A folder with a manifest is complete; a folder
without one is a prepare in progress (or killed), which `moe data prepare` resumes.

A run reads a prepared folder in place (shard by shard, memory-mapped) and never writes to it. It
must tokenize as the folder was prepared: `check_tokenizer` refuses a run whose `data.tokenizer`
differs, naming the folder, before any work.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, List

from moe.data.tokenizers import _tokenizer_spec, build_tokenizer
from moe.errors import DataError

if TYPE_CHECKING:  # only for annotations
    from moe.config import DataConfig

MANIFEST_FILE = "moe_prepared.json"
PLAN_FILE = "moe_prepare_plan.json"
"""Written before the first shard: the settings a resumed prepare must match."""
TOKENIZER_DIR = "tokenizer"
SHARDS_DIR = "shards"
FORMAT_VERSION = 1


def is_prepared(path: str) -> bool:
    """Whether `path` is a complete prepared folder (it has the manifest)."""
    return os.path.isfile(os.path.join(os.path.expanduser(path), MANIFEST_FILE))


def read_manifest(path: str, label: str = "data.dataset") -> dict:
    folder = os.path.expanduser(path)
    try:
        with open(os.path.join(folder, MANIFEST_FILE)) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"{label}={path!r}: cannot read its {MANIFEST_FILE} ({exc}); prepare it again with "
                        f"`moe data prepare`") from None
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{label}={path!r}: prepared in format version {manifest.get('version')}, this moe reads "
                        f"version {FORMAT_VERSION}; prepare it again with `moe data prepare`")
    return manifest


def shard_prefixes(path: str, manifest: dict, split: str) -> List[str]:
    """The `.bin`/`.idx` path prefixes of one split (`train` or `val`), in stream order."""
    folder = os.path.expanduser(path)
    return [os.path.join(folder, SHARDS_DIR, shard["name"], split) for shard in manifest["shards"]]


def describe_tokenizer(spec: dict) -> str:
    if spec["kind"] == "bytes":
        return "bytes"
    if spec["kind"] == "bpe":
        return f"bpe (data.bpe_vocab_size={spec['vocab_size']})"
    return repr(spec.get("path") or spec.get("name"))


def check_tokenizer(cfg: DataConfig, path: str, manifest: dict, label: str = "data.dataset") -> None:
    """DataError unless `cfg.tokenizer` tokenizes as the tokenizer `path` was prepared with.

    `bytes` and `bpe` (same vocabulary size: the folder's BPE was trained on its own corpus) match by
    name; a pretrained tokenizer matches when its vocabulary and rules (its fingerprint) are the same,
    wherever its files are.
    """
    made = manifest["tokenizer"]
    ours = _tokenizer_spec(cfg)
    if made["spec"]["kind"] in ("bytes", "bpe") or ours["kind"] in ("bytes", "bpe"):
        same = made["spec"] == ours
    elif made["spec"]["kind"] == "hub" and ours["kind"] == "hub":
        same = made["spec"]["name"] == ours["name"]
    else:
        same = build_tokenizer(cfg).fingerprint() == made["fingerprint"]
    if not same:
        raise DataError(f"{label}={path!r} was prepared with tokenizer {describe_tokenizer(made['spec'])}, but this "
                        f"run's data.tokenizer is {describe_tokenizer(ours)}: set data.tokenizer to match, or "
                        f"prepare the data again with this tokenizer (`moe data prepare`)")
