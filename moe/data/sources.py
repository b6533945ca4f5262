"""Documents: what `data.dataset` names, read as a stream of documents no further than `data.max_bytes`.

`data.dataset` names a corpus: `embedded:stdlib` (this Python's own standard library source,
present offline on every machine), a local text/json/jsonl/parquet file or folder (an existing file
of any other type is plain text), or a Hugging Face hub dataset (online, or from the HF cache; see
`moe.data.hub`). Each corpus is read as a stream of documents, and no further than
`data.max_bytes`: a text file is read up to it, JSON lines and parquet stop at the record that
reaches it.

`check_config` is the config-time check of the `data` section: what can be told without reading
any data.
"""
from __future__ import annotations

import contextlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, List, Optional, Tuple

from moe.data.cache import _slug
from moe.data.formats import (
    _JSON_EXTS,
    _PARQUET_EXTS,
    _SUPPORTED_EXTS,
    _json_documents,
    _jsonl_documents,
    _open_binary,
    _open_parquet,
    _parquet_documents,
)
from moe.data.hub import _column_texts, _load_hub_split
from moe.errors import ConfigError, DataError

if TYPE_CHECKING:  # only for annotations
    from moe.config import DataConfig

# Corpora that ship with every machine. `embedded:stdlib` is the standard library's *.py source
# (see `_stdlib_files`): on CPython 3.11.7 here, 734 files / 12.1 MB -> 731 non-empty documents,
# 12.1 M byte tokens, tokenized with the `bytes` tokenizer in ~0.2 s.
# `embedded:stdlib-docs` is the natural language of the same files: their docstrings (module, class and
# function), one document per file (see `_docstring_documents`); with `embedded:stdlib` it makes an
# offline two-domain mixture (code vs prose; experiments/mixture_*.yaml).
EMBEDDED_CORPORA: Tuple[str, ...] = ("embedded:stdlib", "embedded:stdlib-docs")

# Directory names skipped in `embedded:stdlib`: the regression suites are huge, repetitive and full
# of deliberately odd code; site-packages is third-party code that differs from machine to machine.
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_STDLIB_MAX_FILE_BYTES = 1 << 20  # a few generated tables are big and would dominate a small corpus


def check_config(d: DataConfig) -> None:
    """Raise ConfigError for a `data` section that cannot work, telling only from the config and the
    file system (no data is read): a BPE vocabulary too small for the 256 bytes plus EOS, a local
    dataset path that does not exist, an embedded corpus that is not known."""
    if d.tokenizer == "bpe" and d.bpe_vocab_size < 260:
        raise ConfigError(f"data.bpe_vocab_size must be >= 260 with data.tokenizer=bpe, got {d.bpe_vocab_size}")
    if d.sources:
        _check_sources(d)
    else:
        _check_dataset("data.dataset", d.dataset)


def _check_dataset(key: str, dataset: str) -> None:
    if not dataset.startswith("embedded:"):
        looks_local = dataset.startswith((".", "/", "~")) or os.path.splitext(dataset)[1] in _SUPPORTED_EXTS
        if looks_local and not os.path.exists(os.path.expanduser(dataset)):
            raise ConfigError(f"{key}: file not found: {dataset}")
    elif dataset not in EMBEDDED_CORPORA:
        raise ConfigError(f"{key}: unknown embedded corpus {dataset!r}; known: {', '.join(EMBEDDED_CORPORA)}")


def _check_sources(d: DataConfig) -> None:
    """Each source named (a metric-safe name, once), with a dataset and a finite weight > 0."""
    if d.tokenizer == "bpe":
        raise ConfigError("data.sources: a mixture needs one tokenizer for every source; data.tokenizer=bpe trains "
                          "one per dataset: use bytes or a pretrained tokenizer (a tokenizer.json path)")
    seen = set()
    for i, src in enumerate(d.sources):
        where = f"data.sources[{i}]" + (f" ({src.name!r})" if src.name else "")
        if not src.name or not all(c.isalnum() or c in "-_." for c in src.name):
            raise ConfigError(f"{where}: name must be non-empty letters, digits, '-', '_' or '.', got {src.name!r}")
        if src.name in seen:
            raise ConfigError(f"{where}: the name {src.name!r} is used twice")
        seen.add(src.name)
        if not src.weight > 0 or src.weight == float("inf"):
            raise ConfigError(f"{where}: weight must be a finite number > 0, got {src.weight}")
        if not src.dataset:
            raise ConfigError(f"{where}: no dataset (a prepared folder, a file or folder, embedded:stdlib or a hub "
                              f"name)")
        _check_dataset(f"{where}.dataset", src.dataset)


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
        elif self.spec == "embedded:stdlib-docs":
            docs = _docstring_documents(self.files)
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
        if spec not in EMBEDDED_CORPORA:
            raise DataError(f"{label}: unknown embedded corpus {spec!r}; known: {', '.join(EMBEDDED_CORPORA)}")
        root = sysconfig.get_paths()["stdlib"]
        files = _stdlib_files(root)
        # Keyed by Python version and the files' names and sizes, not mtimes or the install path:
        # ranks on different nodes must compute the same key for the same library.
        fp = {"kind": "embedded", "name": spec, "python": sys.version.split()[0],
              "files": [[os.path.relpath(p, root), os.path.getsize(p)] for p in files]}
        return _Source("embedded", spec, _slug(spec.split(":", 1)[1]), files, fp, label=label)

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


def _docstring_documents(files: List[str]) -> Iterator[str]:
    """Per file, its module, class and function docstrings (cleaned by `ast.get_docstring`), joined by
    blank lines; a file without any gives no document."""
    import ast

    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for path in files:
        with _open_binary(path) as f:
            source = f.read()
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):  # a file of another Python version: skipped, as a test corpus would be
            continue
        texts = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
        doc = "\n\n".join(t for t in texts if t)
        if doc:
            yield doc + "\n"


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


def _utf8(text: str) -> bytes:
    # 'surrogatepass' so a lone surrogate (possible in JSON data) cannot crash tokenization.
    return text.encode("utf-8", errors="surrogatepass")


def _looks_like_path(spec: str) -> bool:
    """Whether a missing `spec` was meant as a local path, so it is not tried as a hub name.

    Hub names are `name` or `org/name`; a second separator, a leading `.`, `/` or `~`, or a file
    extension (letters after the last dot: `.txt`, `.csv`; `-v1.5` is a hub-style version) make a path.
    """
    ext = os.path.splitext(spec)[1][1:]
    return (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
            or (ext.isascii() and ext.isalpha()))
