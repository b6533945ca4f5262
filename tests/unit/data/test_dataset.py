"""Tests of moe/data/dataset.py: prepare_data's train/val token streams, the writer/reader protocol
between ranks, TokenDataset windows, tokenize_file_for_eval, and the splits-too-small checks (CPU,
a few seconds)."""
from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from moe import data
from moe.data import dataset as dataset_module
from moe.config import DataConfig
from moe.errors import DataError
from tests.helpers import (
    data_cfg,
    pattern_dataset,
    prepare_text_folder,
    split_docs,
    text_of,
    write_jsonl,
    write_text_folder,
)


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    """(cfg, docs, TokenData) of a 40-document text folder."""
    return prepare_text_folder(tmp_path_factory.mktemp("corpus"))


# ------------------------------------------------------------------------------------ prepare_data


def test_prepare_data_text_folder(folder_data):
    cfg, docs, td = folder_data
    assert isinstance(td.tokenizer, data.ByteTokenizer)
    assert td.train.tokens.dtype == np.uint16
    train_docs, val_docs = split_docs(td.train, td.tokenizer), split_docs(td.val, td.tokenizer)
    # One document per file, in sorted file order within each split, nothing lost or duplicated.
    assert sorted(train_docs + val_docs) == sorted(docs.values())
    assert train_docs == [d for d in docs.values() if d in train_docs]
    assert val_docs and train_docs and not set(train_docs) & set(val_docs)
    total_bytes = sum(len(d.encode()) for d in docs.values())
    assert td.train.num_tokens + td.val.num_tokens == total_bytes + len(docs)  # + one EOS each


def test_non_writer_reads_after_barrier(tmp_path):
    write_text_folder(tmp_path / "docs", n_docs=10)
    cfg = DataConfig(dataset=str(tmp_path / "docs"), cache_dir=str(tmp_path / "cache"), val_fraction=0.3)
    barrier = threading.Barrier(2, timeout=60)
    out = {}

    def rank(r):
        out[r] = data.prepare_data(cfg, is_writer=(r == 0), barrier=barrier.wait)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]  # the reader starts first
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.array_equal(out[0].train.tokens, out[1].train.tokens)

    with pytest.raises(RuntimeError, match="writer rank"):
        data.prepare_data(DataConfig(dataset=cfg.dataset, cache_dir=str(tmp_path / "other")), is_writer=False,
                          barrier=lambda: None)


def test_non_writer_ranks_fail_too(tmp_path):
    """Every rank checks local data, so none of them waits in the barrier for a writer that failed."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, "{oops\n"])

    def barrier():
        raise AssertionError("reached the barrier")

    with pytest.raises(DataError, match="line 2"):
        data.prepare_data(data_cfg(tmp_path, path), is_writer=False, barrier=barrier)


def test_split_shorter_than_one_sequence(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("".join(text_of(i) for i in range(4)))  # ~1 KB: val (2%) is ~20 bytes
    cfg = data_cfg(tmp_path, path)
    with pytest.raises(DataError, match=r"small.txt.*\(validation split\): \d+ tokens make 0 sequence\(s\) of "
                                        r"train.seq_len=64, fewer than the 1 of one batch.*larger data.val_fraction"):
        data.prepare_data(cfg, seq_len=64)
    with pytest.raises(DataError, match=r"\(train split\).*train.seq_len=4096.*smaller data.val_fraction"):
        data.prepare_data(data_cfg(tmp_path, path, val_fraction=0.9), seq_len=4096)
    td = data.prepare_data(cfg, seq_len=8)  # the cache built above is complete and reused
    n_val = td.val.num_sequences(8)
    assert n_val >= 1
    with pytest.raises(DataError, match=rf"\(validation split\).*make {n_val} .*fewer than the {n_val + 1} of one"):
        data.prepare_data(cfg, seq_len=8, batch_sequences=n_val + 1)  # micro batch x data-parallel size


# ------------------------------------------------------------------------------------ TokenDataset


def test_sequence_inputs_and_targets_shift_by_one(tmp_path):
    ds = pattern_dataset(tmp_path, 1000)
    assert ds.num_tokens == 1001  # 1000 bytes + EOS
    assert ds.num_sequences(100) == 10 and ds.num_sequences(1000) == 1 and ds.num_sequences(1001) == 0
    seq = ds.sequence(3, 100)
    assert seq.dtype == np.int64 and seq.shape == (101,)
    assert seq.tolist() == [33 + k % 90 for k in range(300, 401)]
    nxt = ds.sequence(4, 100)
    assert nxt[0] == seq[-1]  # windows are adjacent: the last target is the next window's first input
    assert ds.sequence(9, 100)[-1] == 256  # the final EOS is a target
    with pytest.raises(IndexError):
        ds.sequence(10, 100)


def test_token_stream_outlives_its_dataset(tmp_path):
    # The stream is a numpy memmap kept open by its views: reading it after the TokenDataset is
    # gone must not touch an unmapped file (megatron's own reader closes its map in __del__).
    tokens = pattern_dataset(tmp_path, 1000).tokens
    gc.collect()
    assert int(tokens[-1]) == 256 and int(tokens[:10].sum()) == sum(range(33, 43))


# -------------------------------------------------------------------------- tokenize_file_for_eval


def test_tokenize_file_for_eval(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("héllo eval\n" * 50, encoding="utf-8")
    tok = data.ByteTokenizer()
    ds = data.tokenize_file_for_eval(str(path), tok, str(tmp_path / "cache"))
    assert ds.num_tokens == len(path.read_bytes()) + 1
    assert tok.decode(ds.tokens[:-1].tolist()) == path.read_text(encoding="utf-8")
    again = data.tokenize_file_for_eval(str(path), tok, str(tmp_path / "cache"))
    assert again.path_prefix == ds.path_prefix
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        data.tokenize_file_for_eval(str(tmp_path / "nothere.txt"), tok, str(tmp_path / "cache"))


def test_eval_of_an_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"evaluation data '.*empty.jsonl'.*no non-empty 'text' values"):
        data.tokenize_file_for_eval(str(tmp_path / "empty.jsonl"), data.ByteTokenizer(), str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------ shards, large corpora on many ranks


def test_concat_reads_like_one_array():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 500, n).astype(np.uint16) for n in (7, 1, 30, 12)]
    whole = np.concatenate(parts)
    cat = dataset_module._Concat(parts)
    assert cat.shape == whole.shape and len(cat) == len(whole)
    idx = rng.integers(0, len(whole), (5, 9))
    np.testing.assert_array_equal(cat[idx], whole[idx])
    np.testing.assert_array_equal(cat[5:40], whole[5:40])


def test_large_corpus_on_many_ranks_asks_for_moe_data_prepare(tmp_path, monkeypatch):
    write_text_folder(tmp_path / "docs", n_docs=10)
    monkeypatch.setattr(dataset_module, "PREPARE_THRESHOLD_BYTES", 1000)
    cfg = DataConfig(dataset=str(tmp_path / "docs"), cache_dir=str(tmp_path / "cache"), val_fraction=0.3)
    with pytest.raises(DataError, match=r"not tokenized yet, and a 2-process run would wait.*`moe data prepare"):
        data.prepare_data(cfg, is_writer=False, barrier=lambda: pytest.fail("must stop before the barrier"),
                          world_size=2)
    assert not (tmp_path / "cache").exists()
    data.prepare_data(DataConfig(**{**cfg.__dict__, "max_bytes": 900}), world_size=2)  # under it: as before
    data.prepare_data(cfg)  # one process tokenizes it; then the cache serves many
    data.prepare_data(cfg, is_writer=False, barrier=lambda: None, world_size=2)
