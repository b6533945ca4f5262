"""Raw text -> tokenizer -> cached token files -> deterministic per-rank batches.

The pipeline, in the order a training run meets it:

1. **Documents.** `data.dataset` names a corpus: `embedded:stdlib` (this Python's own standard
   library source, present offline on every machine), a local text/json/jsonl/parquet file or folder
   (an existing file of any other type is plain text), or a Hugging Face hub dataset (online, or
   from the HF cache). Each corpus is read as a stream of documents, and no further than
   `data.max_bytes`: a text file is read up to it, JSON lines and parquet stop at the record that
   reaches it.
2. **Split.** Each document goes to validation when a hash of its text falls below
   `data.val_fraction`. Hashing the text (not the position) keeps the split stable when documents
   are added, removed or reordered, and sends exact duplicates to the same side. (Tiny corpora get
   a fallback so neither side is empty; see `_Corpus`.)
3. **Tokenizer.** `bytes` (no training, vocab 257), `bpe` (byte-level BPE trained once on the train
   split and cached) or a pretrained `tokenizers` file / hub name.
4. **Token cache.** Every split is tokenized once into megatron-core's indexed dataset format
   (`.bin` + `.idx`) under `data.cache_dir`, in a folder keyed by a hash of everything that changes
   the tokens. Later runs (and other ranks) memory-map those files instead of re-tokenizing.
5. **Batches.** `TokenDataset` views a split as one long token stream (documents joined by EOS);
   `BatchSampler` cuts it into fixed-length windows and deals them to data-parallel ranks in a
   seeded, resumable order.

Unusable data -- a missing path, no text, a split too small, a malformed JSON line, no
`data.text_field` column, a hub name with the hub out of reach -- raises `moe.errors.DataError`
with one line naming the file, line, column or dataset, before anything is written to the cache
(`prepare_data`'s and `tokenize_file_for_eval`'s checks run before the build).

Heavy libraries (megatron-core, `datasets`, `tokenizers`, pyarrow) are imported inside the functions
that need them: `moe.config.validate` imports this module for `EMBEDDED_CORPORA`, and a config check
should not pay several seconds of imports.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from moe.errors import DataError

if TYPE_CHECKING:  # only for annotations; moe.config imports this module lazily, never at load time
    import torch

    from moe.config import DataConfig

logger = logging.getLogger(__name__)

# Corpora that ship with every machine. `embedded:stdlib` is the standard library's *.py source
# (see `_stdlib_files`): on CPython 3.11.7 here, 734 files / 12.1 MB -> 731 non-empty documents,
# 12.1 M byte tokens, tokenized with the `bytes` tokenizer in ~0.2 s.
EMBEDDED_CORPORA: Tuple[str, ...] = ("embedded:stdlib",)

# Bump when anything in this file changes which tokens end up in the cache, so stale caches are
# never reused silently.
_CACHE_VERSION = 1

# Local files we know how to read in a folder. Plain text is one document per file; json, jsonl and
# parquet one document per record. A single file of any other type (or none) is read as plain text.
_PLAIN_TEXT_EXTS = (".txt", ".md")
_JSON_EXTS = (".json", ".jsonl")
_PARQUET_EXTS = (".parquet",)
_SUPPORTED_EXTS = _PLAIN_TEXT_EXTS + _JSON_EXTS + _PARQUET_EXTS

# Directory names skipped in `embedded:stdlib`: the regression suites are huge, repetitive and full
# of deliberately odd code; site-packages is third-party code that differs from machine to machine.
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_STDLIB_MAX_FILE_BYTES = 1 << 20  # a few generated tables are big and would dominate a small corpus

# End-of-text names pretrained tokenizers use; the first one present becomes `eos_id`.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
_BPE_EOS = "<|endoftext|>"

# How many documents are tokenized per call: big enough for `tokenizers`' batch parallelism.
_ENCODE_BATCH_DOCS = 256
_ENCODE_BATCH_BYTES = 8 << 20


# ============================================================================================ tokenizers


class Tokenizer:
    """Common interface of every tokenizer the models train with.

    `vocab_size` bounds every id `encode` can return (the embedding table size), `eos_id` is the token
    appended after every document in the token stream.
    """

    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: List[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str) -> None:
        raise NotImplementedError

    # ---- not part of the minimal interface; used by the pipeline for speed and cache keys

    def encode_arrays(self, texts: List[str]) -> List[np.ndarray]:
        """Encode several documents at once (implementations override this for speed)."""
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def fingerprint(self) -> str:
        """A string that changes whenever the text -> ids mapping changes (part of cache keys)."""
        raise NotImplementedError

    def _write_meta(self, directory: str, kind: str) -> None:
        # Says which class to rebuild and keeps name/eos_id, which a tokenizer.json alone lacks.
        _write_json(os.path.join(directory, _META_FILE),
                    {"kind": kind, "name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are the tokens (ids 0-255); id 256 is EOS. Needs no training and no files."""

    def __init__(self) -> None:
        self.name = "bytes"
        self.vocab_size = 257
        self.eos_id = 256

    def encode(self, text: str) -> List[int]:
        return list(_utf8(text))

    def encode_arrays(self, texts: List[str]) -> List[np.ndarray]:
        # frombuffer is a zero-copy view of the encoded bytes: this is what keeps tokenizing the
        # embedded corpus well under a second (a per-character Python loop would take ~10 s).
        return [np.frombuffer(_utf8(t), dtype=np.uint8) for t in texts]

    def decode(self, ids: List[int]) -> str:
        # Generated ids can be anything (EOS, half of a multi-byte character): drop non-bytes and
        # let the decoder replace invalid sequences instead of raising mid-generation.
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        # Not a `tokenizers` file (nothing to describe but the scheme); the meta file says so.
        _write_json(os.path.join(directory, "tokenizer.json"),
                    {"type": "moe-bytes", "vocab_size": self.vocab_size, "eos_id": self.eos_id})
        self._write_meta(directory, "bytes")

    def fingerprint(self) -> str:
        return "bytes-v1"


class HFTokenizer(Tokenizer):
    """Wraps a Hugging Face `tokenizers.Tokenizer` (our trained BPE or a pretrained one).

    Documents are encoded without the tokenizer's own special tokens (BOS, post-processor
    templates): the pipeline marks document ends with `eos_id` itself.
    """

    def __init__(self, tok, name: str, eos_id: Optional[int] = None) -> None:
        self._tok = tok
        self.name = name
        if eos_id is None:
            eos_id = _find_or_add_eos(tok)
        self.eos_id = int(eos_id)
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), self.eos_id + 1)

    @property
    def hf_tokenizer(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_arrays(self, texts: List[str]) -> List[np.ndarray]:
        # encode_batch runs in Rust threads; much faster than one call per document.
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: List[int]) -> str:
        # Out-of-range ids are dropped rather than raising (the model's vocab may be padded past
        # the tokenizer's); the byte-level decoder already replaces invalid UTF-8.
        n = self._tok.get_vocab_size(with_added_tokens=True)
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < n], skip_special_tokens=False)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        self._write_meta(directory, "hf")

    def fingerprint(self) -> str:
        return "hf-" + hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:16]


_META_FILE = "moe_tokenizer.json"


def load_saved_tokenizer(directory: str) -> Tokenizer:
    """Inverse of `Tokenizer.save`. Also accepts a plain folder holding a `tokenizers` tokenizer.json."""
    meta_path = os.path.join(directory, _META_FILE)
    tok_path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta["kind"] == "bytes":
            return ByteTokenizer()
        from tokenizers import Tokenizer as _HF

        return HFTokenizer(_HF.from_file(tok_path), name=meta["name"], eos_id=meta["eos_id"])
    if os.path.isfile(tok_path):
        from tokenizers import Tokenizer as _HF

        return HFTokenizer(_HF.from_file(tok_path), name=os.path.abspath(directory))
    raise DataFileNotFound(f"no saved tokenizer in {directory} (expected {tok_path})")


def build_tokenizer(cfg: "DataConfig", train_texts: Optional[Callable[[], Iterable[str]]] = None) -> Tokenizer:
    """The tokenizer `cfg.tokenizer` names.

    `bytes` needs nothing. `bpe` is trained on the train split (documents from `train_texts()`,
    which must yield cfg's train split; by default it is read from cfg) and cached under
    `cfg.cache_dir/tokenizers`, so a second call loads it without calling `train_texts`. Anything else
    is a pretrained `tokenizers` file, a folder holding tokenizer.json, or a hub name (online only).
    """
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        return _build_bpe(cfg, train_texts)
    return _load_pretrained(cfg.tokenizer)


def _build_bpe(cfg: "DataConfig", train_texts: Optional[Callable[[], Iterable[str]]]) -> Tokenizer:
    corpus = _Corpus(_resolve_source(cfg.dataset, cfg.dataset_config, cfg.text_field), cfg.max_bytes,
                     cfg.val_fraction)
    key = _hash_key({"kind": "bpe", "corpus": corpus.key(), "vocab_size": cfg.bpe_vocab_size})
    final = os.path.join(cfg.cache_dir, "tokenizers", f"bpe{cfg.bpe_vocab_size}-{corpus.source.slug}-{key}")

    def train(tmp_dir: str) -> None:
        texts = train_texts() if train_texts is not None else corpus.train_texts()
        t0 = time.perf_counter()
        _train_bpe(texts, cfg.bpe_vocab_size).save(tmp_dir)
        logger.info("trained a %d-token BPE tokenizer in %.1f s -> %s", cfg.bpe_vocab_size,
                    time.perf_counter() - t0, final)

    if train_texts is None and not os.path.isdir(final):
        corpus.check()  # prepare_data has checked its corpus already
    _build_once(final, train, is_writer=True)
    return load_saved_tokenizer(final)


def _train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    # GPT-2 style byte-level BPE: every byte is in the initial alphabet, so any text encodes
    # without unknown tokens, and the byte-level decoder makes decode(encode(x)) == x exactly
    # (no prefix space is added).
    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_BPE_EOS],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, name="bpe", eos_id=tok.token_to_id(_BPE_EOS))


def _load_pretrained(spec: str) -> Tokenizer:
    from tokenizers import Tokenizer as _HF

    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return load_saved_tokenizer(path)  # our own saved folder or any folder with tokenizer.json
    if os.path.isfile(path):
        return HFTokenizer(_HF.from_file(path), name=spec)
    if _looks_like_path(spec):
        raise DataFileNotFound(f"data.tokenizer: file not found: {spec}")
    unreachable = _hub_unreachable()
    try:
        # Unreachable: the local Hugging Face cache only, instead of ~25 s of network retries.
        with _hub_offline() if unreachable else contextlib.nullcontext():
            tok = _HF.from_pretrained(spec)
    except Exception as exc:
        reason = f"the hub is unreachable: {unreachable}" if unreachable else f"{type(exc).__name__}: {_one_line(exc)}"
        raise DataError(
            f"data.tokenizer={spec!r}: not a local file or folder, and it could not be loaded from the Hugging "
            f"Face hub ({reason}); hub tokenizers need internet access: offline, use `bytes`, `bpe` or a local "
            f"tokenizer.json path") from exc
    return HFTokenizer(tok, name=spec)


def _find_or_add_eos(tok) -> int:
    for token in _EOS_CANDIDATES:
        tid = tok.token_to_id(token)
        if tid is not None:
            return tid
    # No end-of-text token (some tokenizers only have padding/unknown): add one, so documents
    # can still be separated. It is saved with the tokenizer and so stays stable.
    tok.add_special_tokens([_BPE_EOS])
    return tok.token_to_id(_BPE_EOS)


# ================================================================================= raw documents


class DataFileNotFound(DataError, FileNotFoundError):
    """A local path in the config does not exist (also a FileNotFoundError, which older callers catch)."""


@dataclass
class _Source:
    """A resolved `data.dataset`: where documents come from and what identifies them for caching."""

    kind: str  # "embedded", "local" or "hub"
    spec: str  # as the user wrote it (for error messages)
    slug: str  # short, filesystem-safe name for cache folders
    files: List[str]  # local/embedded: every file read, in order
    fingerprint: dict  # everything about the source that changes its documents
    text_field: str = "text"
    hub_config: Optional[str] = None
    hub_splits: Tuple[str, ...] = ("train",)
    label: str = "data.dataset"  # what the user set, for messages: the config key or `evaluation data`
    _hub_split: object = field(default=None, init=False, repr=False, compare=False)  # loaded once (see _load_hub_split)

    def documents(self, budget: Optional["_ByteBudget"] = None) -> Iterator[str]:
        """Every non-empty document, in a fixed order; with a budget, only what it still admits."""
        budget = budget or _ByteBudget(0)
        if self.kind == "hub":
            docs: Iterable[str] = _column_texts(self.hub_split(), self.text_field)
        else:
            docs = _file_documents(self, budget)
        # An empty document would only add a lone EOS.
        return budget.take(doc for doc in docs if doc)

    def hub_split(self):
        if self._hub_split is None:
            self._hub_split = _load_hub_split(self)
        return self._hub_split

    def describe(self) -> str:
        """`data.dataset='x'` plus the absolute path a relative local path resolved to."""
        where = f"{self.label}{'=' if self.label.startswith('data.') else ' '}{self.spec!r}"
        if self.kind == "local" and self.fingerprint["path"] != self.spec:
            where += f" ({self.fingerprint['path']})"
        return where


class _ByteBudget:
    """At most `max_bytes` UTF-8 bytes of documents (0 = all); the last document is cut to fit exactly.

    Readers ask `read_size()` before reading a file, so a 1 GB file with max_bytes=1e6 reads (and holds)
    about 1 MB, and record readers stop at the first record past the budget.
    """

    def __init__(self, max_bytes: int) -> None:
        self.remaining = max_bytes if max_bytes > 0 else -1  # -1: no limit

    def read_size(self) -> int:
        # 4 bytes past the budget: every character that starts inside the budget then decodes as it
        # does from the whole file, so `take` cuts the same text as after a full read.
        return -1 if self.remaining < 0 else self.remaining + 4

    def take(self, docs: Iterator[str]) -> Iterator[str]:
        try:
            for doc in docs:
                if self.remaining < 0:
                    yield doc
                    continue
                raw = _utf8(doc)
                if len(raw) >= self.remaining:
                    # 'ignore' drops a multi-byte character cut in half at the boundary.
                    tail = raw[:self.remaining].decode("utf-8", errors="ignore")
                    self.remaining = 0
                    if tail:
                        yield tail
                    return
                self.remaining -= len(raw)
                yield doc
        finally:
            docs.close()  # closes the file the reader has open now, not whenever it is collected


def _resolve_source(spec: str, dataset_config: Optional[str], text_field: str,
                    hub_splits: Tuple[str, ...] = ("train",), label: str = "data.dataset") -> _Source:
    """Reads nothing but file sizes: an existing file (any extension) or folder is local, a missing
    name that looks like a path is an error, anything else is a hub name (checked when loaded)."""
    if spec.startswith("embedded:"):
        if spec != "embedded:stdlib":
            raise DataError(f"{label}: unknown embedded corpus {spec!r}; known: {', '.join(EMBEDDED_CORPORA)}")
        root = sysconfig.get_paths()["stdlib"]
        files = _stdlib_files(root)
        # Keyed by Python version and the files' names and sizes, not mtimes or the install path:
        # ranks on different nodes must compute the same key for the same library.
        fp = {"kind": "embedded", "name": spec, "python": sys.version.split()[0],
              "files": [[os.path.relpath(p, root), os.path.getsize(p)] for p in files]}
        return _Source("embedded", spec, "stdlib", files, fp, label=label)

    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.exists(path):
        files = _folder_files(f"{label}: folder {spec}", path) if os.path.isdir(path) else [path]
        fp = {"kind": "local", "path": path,
              "files": [[os.path.relpath(p, path) if p != path else os.path.basename(p),
                         os.path.getsize(p), os.stat(p).st_mtime_ns] for p in files],
              "text_field": text_field if _needs_text_field(files) else None}
        slug = _slug(os.path.splitext(os.path.basename(path.rstrip(os.sep)))[0])
        return _Source("local", spec, slug, files, fp, text_field=text_field, label=label)
    if _looks_like_path(spec):
        raise DataFileNotFound(f"{label}: file not found: {spec} (no file or folder {path})")
    fp = {"kind": "hub", "name": spec, "config": dataset_config, "text_field": text_field, "splits": list(hub_splits)}
    return _Source("hub", spec, _slug(spec), [], fp, text_field=text_field, hub_config=dataset_config,
                   hub_splits=hub_splits, label=label)


def _stdlib_files(root: str) -> List[str]:
    """`*.py` files of the standard library at `root`, sorted by relative path.

    Here (CPython 3.11.7) that is 734 files, 12.1 MB (about 12.1 M byte tokens).
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending: site-packages alone can be gigabytes.
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                if os.path.getsize(path) <= _STDLIB_MAX_FILE_BYTES:
                    found.append(path)
    # Sort on the '/'-joined relative path so the order does not depend on os.walk's order.
    return sorted(found, key=lambda p: os.path.relpath(p, root).replace(os.sep, "/"))


def _folder_files(what: str, folder: str) -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(_SUPPORTED_EXTS):
                found.append(os.path.join(dirpath, name))
    if not found:
        raise DataError(f"{what} ({folder}) holds no {'/'.join(_SUPPORTED_EXTS)} files "
                        f"(a folder's other files are skipped; name a single file to read it as plain text)")
    return sorted(found, key=lambda p: os.path.relpath(p, folder).replace(os.sep, "/"))


def _needs_text_field(files: List[str]) -> bool:
    return any(p.lower().endswith(_JSON_EXTS + _PARQUET_EXTS) for p in files)


def _file_documents(source: _Source, budget: _ByteBudget) -> Iterator[str]:
    for path in source.files:
        lower = path.lower()
        if lower.endswith(".jsonl"):
            yield from _jsonl_documents(path, source.text_field)
        elif lower.endswith(".json"):
            yield from _json_documents(path, source.text_field)
        elif lower.endswith(_PARQUET_EXTS):
            yield from _parquet_documents(path, source.text_field)
        else:
            # Plain text (and any single file of unknown type the user pointed at): the whole file
            # is one document, so windows span paragraphs and EOS marks real document ends. Read
            # as bytes and decoded leniently: one stray byte should not stop a run.
            with _open_binary(path) as f:
                yield f.read(budget.read_size()).decode("utf-8", errors="replace")


def _open_binary(path: str):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from exc


# JSON and parquet are read here rather than through `datasets`: its json builder converts a whole
# file to Arrow in data_cache/ before the first row (so max_bytes saved nothing) and reports a bad
# line as a generation error without the line number.

def _jsonl_documents(path: str, text_field: str) -> Iterator[str]:
    """The `text_field` of every line's JSON object, streamed (one line in memory at a time)."""
    with _open_binary(path) as f:
        first = True
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8", errors="replace"))
            except ValueError as exc:  # JSONDecodeError; its own line/column count from the line's start
                why = f"{exc.msg} at character {exc.pos + 1}" if isinstance(exc, json.JSONDecodeError) else exc
                raise DataError(f"{path}: line {line_no} is not valid JSON ({why}); fix or delete that line") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {line_no} is a JSON {type(record).__name__}, not an object; "
                                f"JSON lines files hold one object per line")
            if first:
                _check_columns(path, text_field, list(record), f" in its first record (line {line_no})")
                first = False
            if record.get(text_field) is not None:
                yield _as_text(record[text_field])


def _json_documents(path: str, text_field: str) -> Iterator[str]:
    """A .json file: JSON lines (as `datasets` also accepts), a list of objects or an object of columns."""
    with _open_binary(path) as f:
        head = next((line for line in f if line.strip()), b"")
    if not head:
        return
    try:
        is_lines = isinstance(json.loads(head.decode("utf-8", errors="replace")), dict)
    except ValueError:
        is_lines = False  # the first line is part of a larger value
    if is_lines:
        yield from _jsonl_documents(path, text_field)
        return
    with _open_binary(path) as f:
        try:  # a single JSON value has to be parsed whole
            value = json.loads(f.read().decode("utf-8", errors="replace"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if isinstance(value, dict):
        _check_columns(path, text_field, list(value))
        rows = value[text_field] if isinstance(value[text_field], list) else [value[text_field]]
        texts: Iterable = rows
    elif isinstance(value, list):
        if value and isinstance(value[0], dict):
            _check_columns(path, text_field, list(value[0]), " in its first object")
        texts = (row.get(text_field) if isinstance(row, dict) else None for row in value)
    else:
        raise DataError(f"{path}: holds a JSON {type(value).__name__}; expected JSON lines, a list of objects "
                        f"or an object of columns")
    yield from (_as_text(t) for t in texts if t is not None)


def _parquet_documents(path: str, text_field: str) -> Iterator[str]:
    import pyarrow as pa

    pf = _open_parquet(path, text_field)
    try:  # batch by batch: memory stays one row group's column, and reading stops with the budget
        for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
            yield from (_as_text(t) for t in batch.column(0).to_pylist() if t is not None)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read parquet data ({_one_line(exc)})") from exc


def _open_parquet(path: str, text_field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({_one_line(exc)})") from exc
    _check_columns(path, text_field, pf.schema_arrow.names)
    return pf


def _check_columns(path: str, text_field: str, columns: List[str], where: str = "") -> None:
    if text_field not in columns:
        raise DataError(f"{path}: no field {text_field!r} (data.text_field){where}; "
                        f"available columns: {', '.join(map(str, columns)) or '(none)'}")


def _as_text(value) -> str:
    return value if isinstance(value, str) else str(value)


def _check_readable(source: _Source, docs: Iterator[str], full: bool = True) -> None:
    """Raise now what reading `source` would raise mid-build: no text at all, a parquet file without
    the text column (footers are cheap) and, when `full`, a bad JSON line anywhere (so JSON sources
    are read to the end of `docs`, which max_bytes bounds)."""
    for path in source.files:
        if path.lower().endswith(_PARQUET_EXTS):
            _open_parquet(path, source.text_field)
    with contextlib.closing(docs):
        if next(docs, None) is None:
            raise _no_documents(source)
        if full and any(p.lower().endswith(_JSON_EXTS) for p in source.files):
            for _ in docs:
                pass


def _no_documents(source: _Source) -> DataError:
    if source.fingerprint.get("text_field"):  # json/parquet/hub: maybe the wrong column
        what = f"no non-empty {source.text_field!r} values (data.text_field)"
    else:
        what = "no text"
    where = f" in its {len(source.files)} files" if len(source.files) > 1 else ""
    return DataError(f"{source.describe()}: {what}{where}; point {source.label} at a file or folder that holds "
                     f"text")


# ------------------------------------------------------------------------------------ hub datasets

_HUB_PROBE_S = 3.0
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _load_hub_split(source: _Source):
    """The split of a hub dataset that `source.hub_splits` picks, with its text column checked.

    When the hub cannot be reached (an offline flag, or no connection within 3 s) only the local
    Hugging Face cache is tried: `datasets` itself would retry the network for ~25 s first.
    """
    datasets = _import_datasets()
    where = source.describe() + (f" (data.dataset_config={source.hub_config!r})" if source.hub_config else "")
    unreachable = _hub_unreachable()
    try:
        with _hub_offline() if unreachable else contextlib.nullcontext():
            dsd = datasets.load_dataset(source.spec, source.hub_config)
    except Exception as exc:
        if unreachable:
            raise DataError(
                f"{where} is neither a local file or folder (no {os.path.abspath(source.spec)}) nor reachable on "
                f"the Hugging Face hub ({unreachable}), and it is not in the Hugging Face datasets cache; hub "
                f"datasets need internet access: offline, use a local file or folder or `embedded:stdlib`") from exc
        raise DataError(f"{where} is not a local path and could not be loaded from the Hugging Face hub "
                        f"({type(exc).__name__}: {_one_line(exc)}); check the name and data.dataset_config "
                        f"(hub datasets need internet access)") from exc
    # Only one split is read: mixing a hub dataset's test split into training would leak it. The
    # train/val split of this pipeline is then made by document hash, as for every corpus.
    split = next((s for s in source.hub_splits if s in dsd), sorted(dsd)[0])
    ds = dsd[split]
    _check_columns(f"{where} split {split!r}", source.text_field, ds.column_names)
    return ds


def _column_texts(ds, field_name: str) -> Iterator[str]:
    # Batched column access avoids building one dict per row.
    for batch in ds.select_columns([field_name]).iter(batch_size=1000):
        for text in batch[field_name]:
            if text is not None:
                yield _as_text(text)


def _hub_unreachable() -> Optional[str]:
    """Why the Hugging Face hub cannot be used now (an offline flag, no connection), or None."""
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    import urllib.parse
    import urllib.request  # not at module level: it imports http.client and email

    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):  # behind a proxy only the proxy is reachable
        p = urllib.parse.urlparse(proxy if "://" in proxy else "http://" + proxy)
        host, port = p.hostname or host, p.port or (443 if p.scheme == "https" else 80)
    return _tcp_unreachable(host, port, _HUB_PROBE_S)


def _tcp_unreachable(host: str, port: int, timeout: float) -> Optional[str]:
    result: List[str] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append("")
        except OSError as exc:
            result.append(f"cannot connect to {host}:{port}: {exc}")

    # The DNS lookup ignores socket timeouts, so the probe runs in a thread that is not waited for.
    thread = threading.Thread(target=probe, name="moe-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return (result[0] or None) if result else f"no answer from {host}:{port} within {timeout:g} s"


@contextlib.contextmanager
def _hub_offline():
    """Hugging Face libraries in offline mode (cache only, no retries) for the duration.

    Their offline flags are read from the environment at import time, so the module constants are
    set (and restored) rather than the environment variables.
    """
    from huggingface_hub import constants

    modules = [constants] + [m for m in (sys.modules.get("datasets.config"),) if m is not None]
    saved = [m.HF_HUB_OFFLINE for m in modules]
    for m in modules:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, value in zip(modules, saved):
            m.HF_HUB_OFFLINE = value


# ------------------------------------------------------------------------------------ the corpus


class _Corpus:
    """A source's documents after `max_bytes`, and their deterministic train/val split.

    A document goes to validation when the hash of its text (a number in [0, 1)) is below
    `val_fraction`. Small corpora can leave one side empty by chance; then the single document with
    the most extreme hash (the lowest for an empty validation side) is moved across. A corpus of one
    document (a single text file) is instead cut in two: its first (1 - val_fraction) goes to train,
    the rest to validation. All of this depends only on the documents, so every pass over the corpus
    (BPE training, tokenization, other processes) makes the same split.
    """

    def __init__(self, source: _Source, max_bytes: int, val_fraction: float) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.source = source
        self.max_bytes = max_bytes
        self.val_fraction = val_fraction
        self._plan: Optional[Tuple[str, int]] = None

    def key(self) -> dict:
        return {"source": self.source.fingerprint, "max_bytes": self.max_bytes, "val_fraction": self.val_fraction}

    def documents(self) -> Iterator[str]:
        return self.source.documents(_ByteBudget(self.max_bytes))

    def check(self, full: bool = True) -> None:
        """Raise DataError now for whatever would fail the build or leave a split empty, so that it
        fails before anything is written to the cache (`full`: see `_check_readable`)."""
        _check_readable(self.source, self.documents(), full)
        self.plan()

    def plan(self) -> Tuple[str, int]:
        """("hash", -1), ("hash", i) when document i is moved to the empty side, or ("cut", -1)."""
        if self._plan is None:
            seen_val = seen_train = False
            lowest = (2.0, -1)  # (hash, document index)
            highest = (-1.0, -1)
            count, first = 0, ""
            for i, doc in enumerate(self.documents()):
                h = _doc_hash(doc)
                seen_val |= h < self.val_fraction
                seen_train |= h >= self.val_fraction
                if seen_val and seen_train:
                    break  # the common case: a real corpus stops here after a few dozen documents
                lowest, highest = min(lowest, (h, i)), max(highest, (h, i))
                if count == 0:
                    first = doc  # a lone document must be long enough to cut in two
                count += 1
            if seen_val and seen_train:
                self._plan = ("hash", -1)
            elif count == 0:
                raise _no_documents(self.source)
            elif count == 1:
                self._plan = ("cut", -1)
                if not _cut(first, 1.0 - self.val_fraction)[0]:
                    raise DataError(f"{self.source.describe()}: a single document of {len(_utf8(first))} byte(s) "
                                    f"cannot be split into train and validation text; use more text")
                logger.warning("data.dataset=%r is a single document: holding out its last %.1f%% for validation",
                               self.source.spec, 100 * self.val_fraction)
            else:
                self._plan = ("hash", lowest[1] if not seen_val else highest[1])
        return self._plan

    def pieces(self) -> Iterator[Tuple[str, bool]]:
        """(text, is_val) for every piece of every document, in corpus order."""
        mode, flipped = self.plan()
        for i, doc in enumerate(self.documents()):
            if mode == "cut":
                head, tail = _cut(doc, 1.0 - self.val_fraction)
                if head:
                    yield head, False
                if tail:
                    yield tail, True
            else:
                is_val = _doc_hash(doc) < self.val_fraction
                yield doc, (not is_val if i == flipped else is_val)

    def train_texts(self) -> Iterator[str]:
        return (text for text, is_val in self.pieces() if not is_val)


def _doc_hash(text: str) -> float:
    """A uniform number in [0, 1) from the document's bytes: the same text always lands on the same side."""
    digest = hashlib.blake2b(_utf8(text), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _cut(text: str, fraction: float) -> Tuple[str, str]:
    """Split at `fraction` of the text, moved forward to just after a newline when there is one."""
    at = int(len(text) * fraction)
    newline = text.find("\n", at)
    if newline != -1 and newline + 1 < len(text):
        at = newline + 1
    return text[:at], text[at:]


# ================================================================================== token cache


class TokenDataset:
    """One split as a single memory-mapped token stream: documents joined by (ending in) EOS.

    Sequence i of length S is the window tokens[i*S : i*S + S + 1]: S inputs plus the S targets
    shifted by one. Windows do not overlap (apart from that one shared boundary token) and may span
    documents, as in GPT pretraining.
    """

    def __init__(self, path_prefix: str, name: str = "") -> None:
        self.path_prefix = path_prefix
        self.name = name or path_prefix
        """What the tokens came from, for error messages (`data.dataset='x' (train split)`)."""
        bin_path = path_prefix + ".bin"
        if os.path.getsize(bin_path) == 0:
            # numpy cannot memory-map an empty file; an empty split is legal (and reported later
            # by BatchSampler with a clear message).
            self.tokens = np.zeros(0, dtype=np.uint16)
            self.num_documents = 0
        else:
            # megatron-core reads the index (and checks it matches the .bin file)...
            indexed = _megatron_indexed().IndexedDataset(path_prefix, mmap=True)
            dtype = indexed[0].dtype
            total = int(indexed.sequence_lengths.sum(dtype=np.int64))
            self.num_documents = len(indexed)
            del indexed
            # ...but the stream is our own np.memmap of the .bin file (documents back to back, so
            # one flat array). Views of megatron's memory map would dangle -- and segfault when
            # read -- once its IndexedDataset is garbage collected, because its __del__ closes the
            # map; numpy's memmap stays open for as long as any view of it exists.
            self.tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(total,))
        self.num_tokens = int(self.tokens.shape[0])

    def num_sequences(self, seq_len: int) -> int:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        return max(0, (self.num_tokens - 1) // seq_len)

    def sequence(self, i: int, seq_len: int) -> np.ndarray:
        n = self.num_sequences(seq_len)
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range: {n} sequences of length {seq_len}")
        start = i * seq_len
        return np.array(self.tokens[start:start + seq_len + 1], dtype=np.int64)  # a copy, plain ndarray

    def sequences(self, indices: np.ndarray, seq_len: int) -> np.ndarray:
        """int64 [len(indices), seq_len + 1]; one gather from the memory map instead of a loop."""
        indices = np.asarray(indices, dtype=np.int64)
        n = self.num_sequences(seq_len)
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise IndexError(f"sequence index out of range: {n} sequences of length {seq_len}")
        offsets = indices[:, None] * seq_len + np.arange(seq_len + 1, dtype=np.int64)[None, :]
        return np.array(self.tokens[offsets], dtype=np.int64)

    def __repr__(self) -> str:
        return f"TokenDataset({self.path_prefix!r}, num_tokens={self.num_tokens}, num_documents={self.num_documents})"


@dataclass
class TokenData:
    tokenizer: Tokenizer
    train: TokenDataset
    val: TokenDataset
    cache_path: str = ""
    """The cache folder the splits were read from (for logs)."""


def prepare_data(cfg: "DataConfig", is_writer: bool = True, barrier: Optional[Callable[[], None]] = None,
                 seq_len: int = 0, batch_sequences: int = 1) -> TokenData:
    """Tokenizer plus memory-mapped train/val token streams for `cfg`, tokenizing only on a cache miss.

    With several processes, exactly one per cache (rank 0) passes `is_writer=True`. `barrier` is
    called exactly once by every process -- by the writer after building, by the others before
    reading -- so it must be a collective such as `torch.distributed.barrier`. Independent runs
    sharing a cache_dir (a dense and an MoE run started together) are serialised by a file lock:
    the second one waits and then reuses what the first built.

    Unusable data (missing, empty, a bad record, no text column, an offline hub) raises DataError
    before anything is written to `cfg.cache_dir`. With `seq_len` (train.seq_len), a split with
    fewer than `batch_sequences` (micro_batch_size x data-parallel size) sequences is a DataError
    too, here rather than at the first evaluation.
    """
    corpus = _Corpus(_resolve_source(cfg.dataset, cfg.dataset_config, cfg.text_field), cfg.max_bytes,
                     cfg.val_fraction)
    key = _hash_key({"kind": "tokens", "corpus": corpus.key(), "tokenizer": _tokenizer_spec(cfg)})
    tok_name = "bpe" if cfg.tokenizer == "bpe" else _slug(os.path.basename(cfg.tokenizer.rstrip("/")))
    final = os.path.join(cfg.cache_dir, "tokens", f"{corpus.source.slug}-{tok_name}-{key}")
    pretrained = None
    if not os.path.isdir(final):
        # Every rank checks local data, so that most bad files stop them all with the same message
        # instead of leaving the others in the barrier. Only the writer reads JSON to the end (a
        # pass per rank would multiply the I/O), loads a hub dataset, or a pretrained tokenizer.
        if is_writer or corpus.source.kind != "hub":
            corpus.check(full=is_writer)
        if is_writer and cfg.tokenizer not in ("bytes", "bpe"):
            pretrained = build_tokenizer(cfg)

    def build(tmp_dir: str) -> None:
        t0 = time.perf_counter()
        tokenizer = pretrained or build_tokenizer(cfg, train_texts=corpus.train_texts)
        tokenizer.save(os.path.join(tmp_dir, "tokenizer"))
        with _SplitWriter(os.path.join(tmp_dir, "train"), tokenizer) as train, \
                _SplitWriter(os.path.join(tmp_dir, "val"), tokenizer) as val:
            for texts, flags in _batched(corpus.pieces()):
                for ids, is_val in zip(tokenizer.encode_arrays(texts), flags):
                    (val if is_val else train).add(ids)
        seconds = time.perf_counter() - t0
        _write_json(os.path.join(tmp_dir, "meta.json"), {
            "key": corpus.key(), "tokenizer": _tokenizer_spec(cfg), "split_plan": corpus.plan(),
            "train": train.stats(), "val": val.stats(), "build_seconds": round(seconds, 3)})
        logger.info("tokenized %s: %d train / %d val tokens in %.1f s -> %s", cfg.dataset,
                    train.num_tokens, val.num_tokens, seconds, final)

    _build_once(final, build, is_writer=is_writer)
    if barrier is not None:
        barrier()
    if not os.path.isdir(final):
        raise RuntimeError(f"token cache {final} does not exist after the barrier: the writer rank should have "
                           f"built it; do all ranks see the same data.cache_dir ({cfg.cache_dir})?")
    where = corpus.source.describe()
    data = TokenData(tokenizer=load_saved_tokenizer(os.path.join(final, "tokenizer")),
                     train=TokenDataset(os.path.join(final, "train"), f"{where} (train split)"),
                     val=TokenDataset(os.path.join(final, "val"), f"{where} (validation split)"),
                     cache_path=final)
    if seq_len > 0:
        _check_fits(data, seq_len, max(1, batch_sequences), cfg.max_bytes)
    return data


def _check_fits(data: TokenData, seq_len: int, batch_sequences: int, max_bytes: int) -> None:
    """Each split must give one batch of sequences (seq_len inputs plus the shifted target each)."""
    more = "more text" + (f" (a larger data.max_bytes than {max_bytes})" if max_bytes > 0 else "")
    for ds, fraction in ((data.train, "smaller"), (data.val, "larger")):
        n = ds.num_sequences(seq_len)
        if n < batch_sequences:
            raise DataError(f"{ds.name}: {ds.num_tokens} tokens make {n} sequence(s) of train.seq_len={seq_len}, "
                            f"fewer than the {batch_sequences} of one batch; use {more}, a smaller "
                            f"train.seq_len or a {fraction} data.val_fraction")


def tokenize_file_for_eval(path: str, tokenizer: Tokenizer, cache_dir: str, text_field: str = "text",
                           dataset_config: Optional[str] = None) -> TokenDataset:
    """All of `path` (a local text/json/jsonl/parquet file or folder, or a hub dataset) as one
    TokenDataset, cached like training data. No max_bytes and no train/val split: every document
    counts. For a hub dataset, its validation split is used when it has one (else test, else train).
    """
    source = _resolve_source(path, dataset_config, text_field, hub_splits=("validation", "test", "train"),
                             label="evaluation data")
    key = _hash_key({"kind": "eval", "source": source.fingerprint, "tokenizer": tokenizer.fingerprint()})
    final = os.path.join(cache_dir, "eval", f"{source.slug}-{key}")
    if not os.path.isdir(final):
        _check_readable(source, source.documents())  # before anything is written to cache_dir

    def build(tmp_dir: str) -> None:
        with _SplitWriter(os.path.join(tmp_dir, "all"), tokenizer) as out:
            for texts, _ in _batched((doc, False) for doc in source.documents()):
                for ids in tokenizer.encode_arrays(texts):
                    out.add(ids)
        _write_json(os.path.join(tmp_dir, "meta.json"), {"source": source.fingerprint, "all": out.stats()})

    _build_once(final, build, is_writer=True)
    return TokenDataset(os.path.join(final, "all"), source.describe())


def token_dtype(vocab_size: int):
    """uint16 halves the cache (and page cache) for any vocabulary that fits; int32 otherwise."""
    return np.uint16 if vocab_size < 65536 else np.int32


class _SplitWriter:
    """Appends documents (each followed by EOS) to a megatron-core indexed dataset (.bin + .idx)."""

    def __init__(self, path_prefix: str, tokenizer: Tokenizer) -> None:
        self.path_prefix = path_prefix
        self.eos_id = tokenizer.eos_id
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.num_tokens = 0
        self.num_documents = 0
        self._builder = _megatron_indexed().IndexedDatasetBuilder(path_prefix + ".bin", dtype=self.dtype)

    def add(self, ids: np.ndarray) -> None:
        doc = np.empty(len(ids) + 1, dtype=self.dtype)
        doc[:-1] = ids
        doc[-1] = self.eos_id
        self._builder.add_document(doc, [len(doc)])
        self.num_tokens += len(doc)
        self.num_documents += 1

    def stats(self) -> dict:
        return {"tokens": self.num_tokens, "documents": self.num_documents}

    def __enter__(self) -> "_SplitWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._builder.finalize(self.path_prefix + ".idx")
        else:
            # Just release the half-written file; _build_once deletes the whole temp folder.
            self._builder.data_file.close()


def _batched(pieces: Iterable[Tuple[str, bool]]) -> Iterator[Tuple[List[str], List[bool]]]:
    texts: List[str] = []
    flags: List[bool] = []
    size = 0
    for text, flag in pieces:
        texts.append(text)
        flags.append(flag)
        size += len(text)
        if len(texts) >= _ENCODE_BATCH_DOCS or size >= _ENCODE_BATCH_BYTES:
            yield texts, flags
            texts, flags, size = [], [], 0
    if texts:
        yield texts, flags


def _build_once(final: str, build: Callable[[str], None], is_writer: bool) -> None:
    """Make sure folder `final` exists, running `build(tmp_dir)` at most once across processes.

    The folder is built under a temporary name and renamed into place, so `final` existing means
    it is complete (a crash leaves only a temp folder). The file lock makes a second process wait
    for the first instead of building the same thing twice. The writer also removes what killed
    builds of any key left in the same folder.
    """
    parent = os.path.dirname(final)
    if is_writer and os.path.isdir(parent):
        _remove_dead_temp_dirs(parent)
    if os.path.isdir(final):
        return
    os.makedirs(parent, exist_ok=True)
    with _file_lock(final + ".lock", final):
        if os.path.isdir(final) or not is_writer:
            return  # built while we waited (non-writers only wait here for a build in progress)
        name = os.path.basename(final)
        # Temp folders of this key are leftovers of a crashed build (one killed since the sweep
        # above, too): we hold the lock, so nobody else is building it.
        for entry in os.listdir(parent):
            if entry.startswith(f".tmp-{name}-"):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a shared cache must stay readable
        try:
            build(tmp)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _remove_dead_temp_dirs(parent: str) -> None:
    """Delete the `.tmp-<name>-XXXXXXXX` folders in `parent` that no live build owns.

    A build holds `<name>.lock` for as long as its temp folder exists (it renames the folder before
    releasing), so a temp folder whose lock can be taken at once was left by a killed process.
    """
    from filelock import FileLock, Timeout

    for entry in os.listdir(parent):
        # mkdtemp appends 8 random characters to the prefix `.tmp-<name>-`
        if not (entry.startswith(".tmp-") and len(entry) > 14 and entry[-9] == "-"):
            continue
        lock_path = os.path.join(parent, entry[len(".tmp-"):-9] + ".lock")
        lock = FileLock(lock_path)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            continue  # being built right now
        except OSError:  # a cache we may only read: reading it must still work
            logger.debug("cannot take %s to remove %s", lock_path, entry, exc_info=True)
            continue
        try:
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            logger.info("removed %s, left by a killed build", os.path.join(parent, entry))
        finally:
            lock.release()


@contextlib.contextmanager
def _file_lock(lock_path: str, what: str):
    from filelock import FileLock, Timeout

    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=2)
    except Timeout:
        logger.info("waiting for another process to finish building %s", what)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _tokenizer_spec(cfg: "DataConfig") -> dict:
    """What identifies cfg's tokenizer without building it (so a cache hit needs no training)."""
    if cfg.tokenizer == "bytes":
        return {"kind": "bytes"}
    if cfg.tokenizer == "bpe":
        return {"kind": "bpe", "vocab_size": cfg.bpe_vocab_size}
    path = os.path.abspath(os.path.expanduser(cfg.tokenizer))
    if os.path.exists(path):
        files = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
        return {"kind": "local", "path": path,
                "files": [[os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns]
                          for f in files if os.path.isfile(f)]}
    return {"kind": "hub", "name": cfg.tokenizer}


# ======================================================================================== batches


class BatchSampler:
    """Deterministic, per-rank, resumable mid-epoch.

    Epoch e visits the dataset's sequences in the order of a permutation seeded by (seed, e)
    (identity when shuffle=False). That global order is cut into chunks of micro_batch_size *
    dp_size sequences; rank r takes the r-th micro_batch_size slice of each chunk. A trailing partial
    chunk is skipped, and epochs roll over forever.

    Because the global order does not depend on dp_size, one rank with micro batch 2B sees exactly
    what two ranks with micro batch B see together, and the position (in sequences of the global
    order) saved by `state_dict` stays meaningful when the data-parallel layout changes on resume.
    """

    def __init__(self, dataset: TokenDataset, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, shuffle: bool = True) -> None:
        if seq_len <= 0 or micro_batch_size <= 0 or dp_size <= 0:
            raise ValueError(f"seq_len ({seq_len}), micro_batch_size ({micro_batch_size}) and dp_size "
                             f"({dp_size}) must be > 0")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
        self.dataset = dataset
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_sequences = dataset.num_sequences(seq_len)
        self.chunk = micro_batch_size * dp_size
        if self.num_sequences < self.chunk:
            raise DataError(
                f"{dataset.name}: dataset too small: {dataset.num_tokens} tokens make {self.num_sequences} "
                f"sequences of seq_len {seq_len}, fewer than one batch of micro_batch_size {micro_batch_size} x "
                f"data-parallel size {dp_size} = {self.chunk} sequences; use more data (data.max_bytes), a smaller "
                f"train.seq_len or a smaller batch")
        self.epoch = 0
        self.position = 0  # sequences of the epoch's global order already handed out (all ranks)
        self._order_epoch = -1
        self._order: Optional[np.ndarray] = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_sequences // self.chunk

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            else:
                self._order = np.arange(self.num_sequences)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> Tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        if self.position + self.chunk > self.num_sequences:  # trailing partial chunk: next epoch
            self.epoch += 1
            self.position = 0
        chunk = self._epoch_order(self.epoch)[self.position:self.position + self.chunk]
        self.position += self.chunk
        mine = chunk[self.dp_rank * self.micro_batch_size:(self.dp_rank + 1) * self.micro_batch_size]
        windows = torch.from_numpy(self.dataset.sequences(mine, self.seq_len))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def state_dict(self) -> dict:
        # num_sequences and seed are there to catch resuming onto different data, not to restore.
        return {"epoch": self.epoch, "position": self.position, "num_sequences": self.num_sequences,
                "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for name in ("num_sequences", "seed"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(f"sampler state was saved with {name}={state[name]}, but this sampler has "
                                 f"{name}={getattr(self, name)}: the data, train.seq_len or run.seed changed")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


# ========================================================================================= helpers


def _utf8(text: str) -> bytes:
    # 'surrogatepass' so a lone surrogate (possible in JSON data) cannot crash tokenization.
    return text.encode("utf-8", errors="surrogatepass")


def _hash_key(obj) -> str:
    payload = json.dumps({"version": _CACHE_VERSION, "spec": obj}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _slug(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return cleaned[:40] or "data"


def _looks_like_path(spec: str) -> bool:
    """Whether a missing `spec` was meant as a local path, so it is not tried as a hub name.

    Hub names are `name` or `org/name`; a second separator, a leading `.`, `/` or `~`, or a file
    extension (letters after the last dot: `.txt`, `.csv`; `-v1.5` is a hub-style version) make a path.
    """
    ext = os.path.splitext(spec)[1][1:]
    return (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
            or (ext.isascii() and ext.isalpha()))


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line, shortened: it goes into a one-line error."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _import_datasets():
    import datasets

    # Progress bars from `datasets` would interleave with the training progress bar.
    datasets.disable_progress_bars()
    return datasets


def _megatron_indexed():
    # Importing any megatron.core submodule imports the whole package (~3-4 s), which warns about
    # missing Transformer Engine / Apex and its own deprecations: nothing a user of token files
    # can act on, so those import-time warnings are hidden.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset
