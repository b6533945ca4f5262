"""Tests of moe/data/prepared.py: a run reads a prepared folder in place with the tokenizer it was made
with, refuses another tokenizer naming the folder, and never writes to it (CPU, about a second)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from moe.data import prepare_data
from moe.data.prepare import prepare
from moe.data.prepared import MANIFEST_FILE, check_tokenizer, read_manifest
from moe.data.tokenizers import _train_bpe
from moe.errors import DataError
from tests.helpers import data_cfg, listing, write_text_folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    write_text_folder(root / "docs")
    cfg = data_cfg(root, root / "docs", val_fraction=0.2)
    prepare(cfg, str(root / "ready"), shard_bytes=5000)
    return root, cfg, str(root / "ready")


def test_a_run_reads_a_prepared_folder_in_place(prepared, tmp_path):
    root, cfg, folder = prepared
    before = listing(folder)
    run_cfg = data_cfg(tmp_path, folder)  # another cache_dir: nothing may be written there either
    td = prepare_data(run_cfg, is_writer=True, barrier=lambda: pytest.fail("no barrier for prepared data"),
                      seq_len=64, batch_sequences=2, world_size=4)
    reference = prepare_data(cfg)  # the same corpus tokenized the usual way
    np.testing.assert_array_equal(np.asarray(td.train.tokens), np.asarray(reference.train.tokens))
    np.testing.assert_array_equal(td.val.sequences(np.arange(3), 64), reference.val.sequences(np.arange(3), 64))
    assert td.train.num_documents == reference.train.num_documents and td.cache_path == folder
    assert td.tokenizer.fingerprint() == "bytes-v1" and "(prepared) (train split)" in td.train.name
    assert listing(folder) == before and not os.path.exists(tmp_path / "cache")
    with pytest.raises(DataError, match=r"3 sequence\(s\)|fewer than the"):
        prepare_data(run_cfg, seq_len=10**4)


def test_another_tokenizer_is_refused_naming_the_folder(prepared, tmp_path):
    _, _, folder = prepared
    with pytest.raises(DataError, match=rf"data.dataset='{folder}' was prepared with tokenizer bytes, but this run's "
                                        r"data.tokenizer is bpe \(data.bpe_vocab_size=300\)"):
        prepare_data(data_cfg(tmp_path, folder, tokenizer="bpe", bpe_vocab_size=300))
    assert not os.path.exists(tmp_path / "cache")


def test_pretrained_tokenizers_match_by_fingerprint(tmp_path):
    write_text_folder(tmp_path / "docs", n_docs=12)
    tok_a = _train_bpe(["some text to learn merges from " * 20], 280)
    tok_b = _train_bpe(["entirely different words here " * 20], 280)
    tok_a.save(str(tmp_path / "tok_a"))
    tok_b.save(str(tmp_path / "tok_b"))
    cfg = data_cfg(tmp_path, tmp_path / "docs", tokenizer=str(tmp_path / "tok_a" / "tokenizer.json"))
    prepare(cfg, str(tmp_path / "ready"))
    manifest = read_manifest(str(tmp_path / "ready"))
    assert manifest["tokenizer"]["fingerprint"] == tok_a.fingerprint()
    check_tokenizer(data_cfg(tmp_path, "x", tokenizer=str(tmp_path / "tok_a")), "ready", manifest)  # the folder
    with pytest.raises(DataError, match="was prepared with tokenizer .*tok_a/tokenizer.json.*tok_b"):
        check_tokenizer(data_cfg(tmp_path, "x", tokenizer=str(tmp_path / "tok_b")), "ready", manifest)
    with pytest.raises(DataError, match="data.tokenizer is bytes"):
        check_tokenizer(data_cfg(tmp_path, "x"), "ready", manifest)


def test_damaged_or_newer_manifest(prepared, tmp_path):
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(DataError, match=f"cannot read its {MANIFEST_FILE}"):
        read_manifest(str(tmp_path))
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"version": 99}))
    with pytest.raises(DataError, match="format version 99"):
        read_manifest(str(tmp_path))
