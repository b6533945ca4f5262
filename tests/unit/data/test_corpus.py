"""Tests of moe/data/corpus.py: the train/val split by document hash, and its fallbacks for corpora of
a few documents or one (CPU, a few seconds)."""
from __future__ import annotations

import pytest

from moe import data
from moe.config import DataConfig
from tests.helpers import data_cfg, make_doc, prepare_fails, prepare_text_folder, split_docs, write_text_folder


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    """(cfg, docs, TokenData) of a 40-document text folder."""
    return prepare_text_folder(tmp_path_factory.mktemp("corpus"))


def test_split_is_deterministic_by_document_hash(folder_data, tmp_path):
    cfg, docs, td = folder_data
    val_docs = set(split_docs(td.val, td.tokenizer))
    # A fresh cache, and the files in another folder with other names: same split, because it
    # depends on each document's text only.
    folder = tmp_path / "renamed"
    folder.mkdir()
    for i, text in enumerate(reversed(list(docs.values()))):
        (folder / f"x{i:03d}.txt").write_text(text, encoding="utf-8")
    td2 = data.prepare_data(DataConfig(dataset=str(folder), cache_dir=str(tmp_path / "c2"), val_fraction=0.2))
    assert set(split_docs(td2.val, td2.tokenizer)) == val_docs


def test_few_documents_still_give_both_splits(tmp_path):
    # 3 documents at val_fraction 0.02: the hash alone would almost surely leave val empty.
    folder = tmp_path / "three"
    write_text_folder(folder, n_docs=3)
    td = data.prepare_data(DataConfig(dataset=str(folder), cache_dir=str(tmp_path / "c")))
    assert len(split_docs(td.train, td.tokenizer)) == 2 and len(split_docs(td.val, td.tokenizer)) == 1
    # A single file is cut: its head trains, its tail validates.
    one = tmp_path / "one.txt"
    one.write_text("".join(make_doc(i) for i in range(20)), encoding="utf-8")
    td = data.prepare_data(DataConfig(dataset=str(one), cache_dir=str(tmp_path / "c"), val_fraction=0.1))
    head, tail = split_docs(td.train, td.tokenizer), split_docs(td.val, td.tokenizer)
    assert head[0] + tail[0] == one.read_text(encoding="utf-8")
    assert 0.05 < td.val.num_tokens / (td.train.num_tokens + td.val.num_tokens) < 0.15


def test_one_byte_file_cannot_be_split(tmp_path):
    # Today this "works" and leaves an empty train split for the sampler to trip over later.
    (tmp_path / "one.txt").write_text("a")
    prepare_fails(data_cfg(tmp_path, tmp_path / "one.txt"), "one.txt", "single document", "use more text")
