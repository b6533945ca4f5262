"""Tests of moe/data/prepare.py: `moe data prepare` writes the same tokens as a run's own tokenization
(prepare_data, the reference here) with 1 or 2 workers, resumes a killed prepare exactly, refuses an
unusable --out before writing, and loads DATA.yaml files (CPU, a few seconds)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from moe.config import ConfigError
from moe.data import prepare as prep
from moe.data import prepare_data
from moe.data.prepared import MANIFEST_FILE, PLAN_FILE, SHARDS_DIR, is_prepared
from moe.errors import DataError
from tests.helpers import data_cfg, listing, write_text_folder

SHARD = 3000  # characters: the 40 test documents (~400 characters each) make ~6 shards


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    docs = write_text_folder(root / "docs")
    cfg = data_cfg(root, root / "docs", val_fraction=0.2)
    return root, cfg, docs, prepare_data(cfg)


def _tokens(folder, split):
    shards = sorted(os.listdir(os.path.join(folder, SHARDS_DIR)))
    parts = [np.fromfile(os.path.join(folder, SHARDS_DIR, s, f"{split}.bin"), dtype=np.uint16) for s in shards]
    return np.concatenate(parts)


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_equals_a_runs_own_tokenization(corpus, tmp_path, workers):
    _, cfg, docs, reference = corpus
    m = prep.prepare(cfg, str(tmp_path / "out"), workers=workers, shard_bytes=SHARD)
    assert len(m["shards"]) > 3 and is_prepared(str(tmp_path / "out"))
    for split, ref in (("train", reference.train), ("val", reference.val)):
        np.testing.assert_array_equal(_tokens(tmp_path / "out", split), np.asarray(ref.tokens))
        assert m[split]["tokens"] == ref.num_tokens and m[split]["documents"] == ref.num_documents
    assert m["documents"] == len(docs) and m["bytes"] == sum(len(d.encode()) for d in docs.values())
    assert m["last_call"]["workers"] == workers and m["last_call"]["new_tokens"] == m["tokens"]
    assert m["tokenizer"]["fingerprint"] == "bytes-v1"
    assert not [e for e in os.listdir(tmp_path / "out" / SHARDS_DIR) if e.startswith(".")]


def test_killed_prepare_resumes_to_the_same_tokens(corpus, tmp_path, monkeypatch):
    _, cfg, _, reference = corpus
    out = str(tmp_path / "out")
    real, written = prep._write_shard, []

    def dies_after_two(out_, name, texts, flags):
        if len(written) == 2:
            os.makedirs(os.path.join(out_, SHARDS_DIR, f".tmp-{name}-halfdone"))  # what a kill leaves
            raise KeyboardInterrupt
        written.append(name)
        return real(out_, name, texts, flags)

    monkeypatch.setattr(prep, "_write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(cfg, out, shard_bytes=SHARD)
    assert not is_prepared(out) and sorted(os.listdir(os.path.join(out, SHARDS_DIR)))[1:] == written
    kept = {n: os.stat(os.path.join(out, SHARDS_DIR, n, "train.bin")).st_ino for n in written}
    monkeypatch.setattr(prep, "_write_shard", real)
    m = prep.prepare(cfg, out, shard_bytes=SHARD)
    assert m["last_call"]["new_tokens"] < m["tokens"]  # only the missing shards were tokenized
    assert kept == {n: os.stat(os.path.join(out, SHARDS_DIR, n, "train.bin")).st_ino for n in written}
    np.testing.assert_array_equal(_tokens(out, "train"), np.asarray(reference.train.tokens))
    np.testing.assert_array_equal(_tokens(out, "val"), np.asarray(reference.val.tokens))
    assert not [e for e in os.listdir(os.path.join(out, SHARDS_DIR)) if e.startswith(".")]
    # A finished folder is not rewritten by a second call.
    before = listing(out)
    assert prep.prepare(cfg, out, shard_bytes=SHARD)["last_call"]["workers"] == 0
    assert listing(out) == before


def test_unusable_out_is_refused_before_writing(corpus, tmp_path):
    _, cfg, _, _ = corpus
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"--out .*busy: exists and is not a prepared folder"):
        prep.prepare(cfg, str(tmp_path / "busy"))
    assert os.listdir(tmp_path / "busy") == ["notes.txt"]
    out = tmp_path / "out"
    out.mkdir()
    (out / PLAN_FILE).write_text(json.dumps({"version": 1, "shard_bytes": 1}))
    with pytest.raises(DataError, match=r"unfinished prepare with other settings \(differs in corpus, shard_bytes"):
        prep.prepare(cfg, str(out))
    prep.prepare(cfg, str(tmp_path / "done"), shard_bytes=SHARD)
    with pytest.raises(DataError, match=r"already holds data prepared with other settings \(differs in shard_bytes\)"):
        prep.prepare(cfg, str(tmp_path / "done"), shard_bytes=SHARD + 1)
    with pytest.raises(DataError, match="--workers must be >= 1"):
        prep.prepare(cfg, str(tmp_path / "new"), workers=0)
    assert not (tmp_path / "new").exists()


def test_bad_corpus_fails_before_anything_is_written(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(DataError, match="no text"):
        prep.prepare(data_cfg(tmp_path, tmp_path / "empty"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_load_data_config(tmp_path):
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text("dataset: embedded:stdlib\nmax_bytes: 1.0e5\ndataset_config: null\n")
    d = prep.load_data_config(str(data_yaml), ["data.val_fraction=0.1"])
    assert (d.dataset, d.max_bytes, d.val_fraction, d.dataset_config) == ("embedded:stdlib", 100000, 0.1, None)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("data:\n  max_bytes: 5000\ntrain:\n  steps: 3\n")
    assert prep.load_data_config(str(run_yaml)).max_bytes == 5000
    (tmp_path / "bad.yaml").write_text("dataset: embedded:stdlib\nmax_bites: 3\n")
    with pytest.raises(ConfigError, match="max_bites"):
        prep.load_data_config(str(tmp_path / "bad.yaml"))
    (tmp_path / "missing.yaml").write_text("dataset: /no/such/folder\n")
    with pytest.raises(ConfigError, match="data.dataset: file not found: /no/such/folder"):
        prep.load_data_config(str(tmp_path / "missing.yaml"))


def test_default_out_names_corpus_and_tokenizer(corpus):
    root, cfg, _, _ = corpus
    out = prep.default_out(cfg)
    assert out.startswith(os.path.join(cfg.cache_dir, "prepared", "docs-bytes-"))
    assert prep.default_out(data_cfg(root, cfg.dataset, val_fraction=0.3)) != out
    assert MANIFEST_FILE not in os.listdir(root)
