"""Tests of moe/data/cache.py: cache hits read without re-tokenizing, keys change with what changes the
tokens, one build across concurrent runs, and killed builds leave nothing in use (CPU, a few seconds)."""
from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
from filelock import FileLock

from moe import data
from moe.config import DataConfig
from moe.data import cache, dataset
from moe.errors import DataError
from tests.helpers import data_cfg, prepare_text_folder, text_of, write_jsonl, write_text_folder


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    """(cfg, docs, TokenData) of a 40-document text folder."""
    return prepare_text_folder(tmp_path_factory.mktemp("corpus"))


def test_cache_hit_does_not_retokenize(folder_data, monkeypatch):
    cfg, _, td = folder_data
    mtimes = {p: os.stat(os.path.join(td.cache_path, p)).st_mtime_ns for p in os.listdir(td.cache_path)}

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized on a cache hit")

    monkeypatch.setattr(dataset, "build_tokenizer", fail)  # where prepare_data looks it up
    monkeypatch.setattr(cache._SplitWriter, "add", fail)
    td2 = data.prepare_data(cfg)
    assert td2.cache_path == td.cache_path
    assert np.array_equal(td2.train.tokens, td.train.tokens) and np.array_equal(td2.val.tokens, td.val.tokens)
    assert mtimes == {p: os.stat(os.path.join(td.cache_path, p)).st_mtime_ns for p in os.listdir(td.cache_path)}


def test_cache_key_changes_with_tokens_settings(folder_data, tmp_path):
    cfg, docs, td = folder_data
    other = data.prepare_data(DataConfig(dataset=cfg.dataset, cache_dir=cfg.cache_dir, val_fraction=0.5))
    assert other.cache_path != td.cache_path
    # Editing a file changes its size/mtime and so the key.
    folder = tmp_path / "docs"
    write_text_folder(folder, n_docs=5)
    c = DataConfig(dataset=str(folder), cache_dir=str(tmp_path / "cache"), val_fraction=0.3)
    first = data.prepare_data(c)
    with open(folder / "doc000.txt", "a") as f:
        f.write("one more line\n")
    second = data.prepare_data(c)
    assert second.cache_path != first.cache_path
    assert second.train.num_tokens + second.val.num_tokens == first.train.num_tokens + first.val.num_tokens + 14


def test_concurrent_builds_share_one_cache(tmp_path, monkeypatch):
    """Two runs started together on one cache_dir: one tokenizes, the other waits and reuses it."""
    write_text_folder(tmp_path / "docs", n_docs=10)
    cfg = DataConfig(dataset=str(tmp_path / "docs"), cache_dir=str(tmp_path / "cache"), val_fraction=0.3)
    builds = []
    real_build_tokenizer = dataset.build_tokenizer

    def counting_build_tokenizer(*args, **kwargs):
        builds.append(1)
        return real_build_tokenizer(*args, **kwargs)

    monkeypatch.setattr(dataset, "build_tokenizer", counting_build_tokenizer)  # where prepare_data looks it up
    results, errors = [], []

    def run():
        try:
            results.append(data.prepare_data(cfg))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and builds == [1]
    assert len({r.cache_path for r in results}) == 1
    assert [p for p in os.listdir(os.path.dirname(results[0].cache_path)) if p.startswith(".tmp")] == []


# ------------------------------------------------------------------------ leftovers of killed builds


def test_leftover_temp_folders_of_killed_builds_are_removed(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("".join(text_of(i) for i in range(30)))
    cfg = data_cfg(tmp_path, path, val_fraction=0.2)
    first = data.prepare_data(cfg)
    tokens_dir = os.path.dirname(first.cache_path)
    # What `kill -9` during tokenization leaves: a temp folder (of another key here) and its lock file...
    dead = os.path.join(tokens_dir, ".tmp-d-bytes-0123456789abcdef-k1ll3d_x")
    os.makedirs(dead)
    (tmp_path / "half.bin").write_bytes(b"\0" * 100)
    os.replace(tmp_path / "half.bin", os.path.join(dead, "train.bin"))
    open(os.path.join(tokens_dir, "d-bytes-0123456789abcdef.lock"), "w").close()
    # ...and one a live process is building right now (its lock is held).
    busy = os.path.join(tokens_dir, ".tmp-d-bytes-fedcba9876543210-bu5y_abc")
    os.makedirs(busy)
    with FileLock(os.path.join(tokens_dir, "d-bytes-fedcba9876543210.lock")):
        again = data.prepare_data(cfg)  # a cache hit still sweeps the folder
        assert not os.path.exists(dead) and os.path.isdir(busy)
    assert again.cache_path == first.cache_path
    data.prepare_data(cfg)
    assert not os.path.exists(busy)  # its builder is gone now


def test_killed_build_never_leaves_a_cache_in_use(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": text_of(i)} for i in range(30)])
    cfg = data_cfg(tmp_path, path, val_fraction=0.2)
    real_add = cache._SplitWriter.add
    added = []

    def add_then_die(self, ids):
        added.append(1)
        if len(added) == 5:
            raise KeyboardInterrupt  # a signal in the middle of writing the token files
        real_add(self, ids)

    monkeypatch.setattr(cache._SplitWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        data.prepare_data(cfg)
    tokens_dir = tmp_path / "cache" / "tokens"
    assert [p for p in os.listdir(tokens_dir) if not p.endswith(".lock")] == []
    monkeypatch.setattr(cache._SplitWriter, "add", real_add)
    td = data.prepare_data(cfg)
    assert td.train.num_documents + td.val.num_documents == 30
    assert json.load(open(os.path.join(td.cache_path, "meta.json")))["train"]["documents"] == td.train.num_documents


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_index_reader_agrees_with_megatron_core(tmp_path, dtype):
    """`read_index` (which spares readers the megatron.core import) against megatron-core's own reader, on
    files its builder wrote; and a .bin that does not belong to its .idx is refused by name."""
    indexed = cache._megatron_indexed()
    assert {c: getattr(np, indexed.DType(c).name) for c in cache.INDEX_DTYPES} == cache.INDEX_DTYPES
    assert indexed._INDEX_HEADER == cache.INDEX_MAGIC
    prefix = str(tmp_path / "split")
    builder = indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    rng = np.random.default_rng(0)
    for n in (5, 1, 300, 17):
        builder.add_document(rng.integers(0, 60000, n).astype(dtype), [n])  # as _SplitWriter adds them
    builder.finalize(prefix + ".idx")

    theirs = indexed.IndexedDataset(prefix, mmap=True)
    assert cache.read_index(prefix) == (theirs[0].dtype.type, len(theirs), int(theirs.sequence_lengths.sum()))
    stream, docs = dataset._open_tokens(prefix)
    assert docs == 4 and np.array_equal(stream, np.concatenate([theirs[i] for i in range(4)]))
    del theirs

    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(DataError, match="split.bin holds .* does not belong"):
        cache.read_index(prefix)
    (tmp_path / "split.idx").write_bytes(b"not an index")
    with pytest.raises(DataError, match="split.idx is not a megatron-core index"):
        cache.read_index(prefix)
