"""The on-disk token cache: folders keyed by a hash, built once across processes, in megatron-core files.

Every split is tokenized once into megatron-core's indexed dataset format (`.bin` + `.idx`) under
`data.cache_dir`, in a folder keyed by a hash of everything that changes the tokens (`_hash_key`).
Later runs (and other ranks) memory-map those files instead of re-tokenizing. A folder is built
under a temporary name and renamed into place under a file lock (`_build_once`), so a folder that
exists is complete, and two processes never build the same one twice.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from typing import TYPE_CHECKING, Callable

import numpy as np

from moe.errors import DataError

if TYPE_CHECKING:  # only for annotations: moe.data.tokenizers imports this module
    from moe.data.tokenizers import Tokenizer

logger = logging.getLogger(__name__)

# Bump when anything in this package changes which tokens end up in the cache, so stale caches are
# never reused silently.
_CACHE_VERSION = 1


def _hash_key(obj) -> str:
    payload = json.dumps({"version": _CACHE_VERSION, "spec": obj}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _slug(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return cleaned[:40] or "data"


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def token_dtype(vocab_size: int):
    """uint16 halves the cache (and page cache) for any vocabulary that fits; int32 otherwise."""
    return np.uint16 if vocab_size < 65536 else np.int32


def _megatron_indexed():
    # Importing any megatron.core submodule imports the whole package (~3-4 s), which warns about
    # missing Transformer Engine / Apex and its own deprecations: nothing a user of token files
    # can act on, so those import-time warnings are hidden.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


INDEX_MAGIC = b"MMIDIDX\x00\x00"
"""The first bytes of a megatron-core .idx file (version 1: then dtype code, sequence and document counts)."""
INDEX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                8: np.uint16}
"""megatron-core's token dtype codes (`indexed_dataset.DType`; tests/unit/data checks they still agree)."""


def read_index(path_prefix: str):
    """(token dtype, number of sequences, number of tokens) of a megatron-core indexed dataset, from the
    header and sequence lengths of its .idx, checked against the size of its .bin.

    Reading these few fields here, not through megatron-core's `IndexedDataset`, spares every process
    that only reads tokens the import of megatron.core (it imports the whole package: a debug `moe train`
    process started in 9.6 s with it, 6.3 s without). Writing still goes through megatron-core's builder,
    and tests/unit/data/test_cache.py checks this reader against its reader."""
    idx_path, bin_path = path_prefix + ".idx", path_prefix + ".bin"
    with open(idx_path, "rb") as f:
        header = f.read(34)
        if len(header) < 34 or header[:9] != INDEX_MAGIC or int.from_bytes(header[9:17], "little") != 1:
            raise DataError(f"{idx_path} is not a megatron-core index (version 1)")
        code = header[17]
        if code not in INDEX_DTYPES:
            raise DataError(f"{idx_path}: unknown token dtype code {code}")
        sequences = int.from_bytes(header[18:26], "little")
        lengths = np.fromfile(f, dtype=np.int32, count=sequences)
    if len(lengths) != sequences:
        raise DataError(f"{idx_path} is truncated: {len(lengths)} of {sequences} sequence lengths")
    dtype = INDEX_DTYPES[code]
    tokens = int(lengths.sum(dtype=np.int64))
    size = os.path.getsize(bin_path)
    if size != tokens * np.dtype(dtype).itemsize:
        raise DataError(f"{bin_path} holds {size} bytes, but its index describes {tokens} tokens of "
                        f"{np.dtype(dtype).name}: the pair does not belong together (rebuild or re-prepare it)")
    return dtype, sequences, tokens


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
    # Deferred like the package's other third-party imports; filelock comes with `datasets`.
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
