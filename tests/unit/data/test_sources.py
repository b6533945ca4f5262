"""Tests of moe/data/sources.py: what data.dataset names (embedded corpus, local file or folder, a
missing path), max_bytes as a read limit, and check_config (CPU, in-process, a few seconds, no network)."""
from __future__ import annotations

import json
import os
import socket
import sysconfig

import numpy as np
import pytest

from moe import data
from moe.config import DataConfig
from moe.config import DataSourceConfig
from moe.data import sources
from moe.errors import ConfigError, DataError
from tests.helpers import data_cfg, prepare_fails, split_docs, text_of, write_jsonl


@pytest.fixture
def no_hub(monkeypatch):
    """Any hub access fails the test: no network, no `datasets.load_dataset`."""
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError(f"went to the hub: {args}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------- embedded corpora


def test_embedded_stdlib_small(tmp_path):
    cfg = DataConfig(dataset="embedded:stdlib", max_bytes=200_000, cache_dir=str(tmp_path / "c"), val_fraction=0.1)
    td = data.prepare_data(cfg)
    docs = split_docs(td.train, td.tokenizer) + split_docs(td.val, td.tokenizer)
    assert sum(len(d.encode()) for d in docs) == 200_000  # max_bytes is exact (last file cut)
    assert td.val.num_tokens > 0 and "import" in docs[0] + docs[1]
    files = sources._stdlib_files(sysconfig.get_paths()["stdlib"])
    rel = [os.path.relpath(p, sysconfig.get_paths()["stdlib"]) for p in files]
    assert rel == sorted(rel) and len(rel) > 300
    assert not any(part in ("test", "tests", "idle_test", "site-packages") for r in rel for part in r.split(os.sep))


def test_embedded_stdlib_docs_are_the_docstrings(tmp_path):
    import ast

    source = sources._resolve_source("embedded:stdlib-docs", None, "text")
    assert source.slug == "stdlib-docs" and source.fingerprint["name"] == "embedded:stdlib-docs"
    docs = source.documents(sources._ByteBudget(50_000))
    first = next(docs)
    docs.close()
    path = next(p for p in source.files if ast.get_docstring(ast.parse(open(p, "rb").read())))
    assert first.startswith(ast.get_docstring(ast.parse(open(path, "rb").read())))
    assert "def " not in first.split("\n")[0]
    cfg = DataConfig(dataset="embedded:stdlib-docs", max_bytes=50_000, cache_dir=str(tmp_path / "c"), val_fraction=0.2)
    assert data.prepare_data(cfg).train.num_tokens > 30_000


# --------------------------------------------------------------------------- empty or missing data


def test_missing_dataset_names_the_path(tmp_path):
    for missing in (str(tmp_path / "nope"), str(tmp_path / "nope.jsonl"), "./relative/missing.txt"):
        with pytest.raises(FileNotFoundError, match="missing|nope"):
            data.prepare_data(DataConfig(dataset=missing, cache_dir=str(tmp_path / "cache")))
    with pytest.raises(ValueError, match="embedded:nothing"):
        data.prepare_data(DataConfig(dataset="embedded:nothing", cache_dir=str(tmp_path / "cache")))


@pytest.mark.parametrize("kind", ["empty_txt", "folder_of_empty_files", "jsonl_without_text"])
def test_no_text_at_all(tmp_path, kind):
    if kind == "empty_txt":
        target = tmp_path / "empty.txt"
        target.write_bytes(b"")
    elif kind == "folder_of_empty_files":
        target = tmp_path / "folder"
        target.mkdir()
        for name in ("a.txt", "b.md"):
            (target / name).write_bytes(b"")
    else:
        target = tmp_path / "rows.jsonl"
        write_jsonl(target, [{"text": ""}, {"text": None}, "\n", {"text": ""}])
    prepare_fails(data_cfg(tmp_path, target), f"data.dataset={str(target)!r}", "no ", "point data.dataset at")


# ------------------------------------------------------------------ local paths are never hub names


def test_existing_files_without_extension_are_read_locally(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").write_text("".join(text_of(i) for i in range(5)))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus").write_text("".join(text_of(i) for i in range(5, 10)))
    for spec, expected in (("mydata", 5), ("data/corpus", 10)):
        td = data.prepare_data(DataConfig(dataset=spec, cache_dir=str(tmp_path / "cache")))
        text = td.tokenizer.decode(np.concatenate([td.train.tokens, td.val.tokens]).tolist())
        assert text == (tmp_path / spec).read_text() and f"document {expected - 1}" in text
        ds = data.tokenize_file_for_eval(spec, td.tokenizer, str(tmp_path / "cache"))
        assert ds.num_tokens == len((tmp_path / spec).read_bytes()) + 1


@pytest.mark.parametrize("spec", ["a/b/c", "./relative", "~/no_such_moe_dir/x", "corpus.txt", "data/corpus.csv",
                                  "org/set.parquet", "corpus.jsonl"])
def test_missing_path_is_file_not_found(tmp_path, monkeypatch, no_hub, spec):
    monkeypatch.chdir(tmp_path)
    error = prepare_fails(DataConfig(dataset=spec, cache_dir=str(tmp_path / "cache")),
                          f"data.dataset: file not found: {spec}")
    assert isinstance(error, FileNotFoundError)
    with pytest.raises(DataError, match=f"evaluation data: file not found: {spec}"):
        data.tokenize_file_for_eval(spec, data.ByteTokenizer(), str(tmp_path / "cache"))


# ---------------------------------------------------------------------------- max_bytes is a limit


def bytes_read() -> int:
    """Bytes this process has read through system calls so far (Linux)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_max_bytes_reads_only_a_prefix(tmp_path, fmt):
    # Warm up first: megatron-core and the rest are imported (and their files read) here.
    (tmp_path / "warm.txt").write_text(text_of(0) * 3)
    data.prepare_data(data_cfg(tmp_path, tmp_path / "warm.txt"))
    line = text_of(1)
    if fmt == "txt":
        path = tmp_path / "big.txt"
        path.write_text(line * (20_000_000 // len(line)))
    else:
        path = tmp_path / "big.jsonl"
        row = json.dumps({"text": line}) + "\n"
        path.write_text(row * (20_000_000 // len(row)))
    assert path.stat().st_size > 19_000_000

    before = bytes_read()
    td = data.prepare_data(data_cfg(tmp_path, path, max_bytes=10_000, val_fraction=0.1))
    read = bytes_read() - before
    assert read < 1_000_000, f"read {read} bytes of a {path.stat().st_size}-byte file for max_bytes=10000"
    docs = td.train.num_documents + td.val.num_documents
    assert td.train.num_tokens + td.val.num_tokens == 10_000 + docs  # exactly max_bytes, plus one EOS each


# ------------------------------------------------------------------------------------ check_config


def test_check_config_accepts_what_can_work(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("text")
    for d in (DataConfig(), DataConfig(dataset="embedded:stdlib"), DataConfig(tokenizer="bpe", bpe_vocab_size=260),
              DataConfig(tokenizer="bytes", bpe_vocab_size=1), DataConfig(dataset="corpus.txt"),
              DataConfig(dataset=str(tmp_path / "corpus.txt")),
              # hub-shaped names and extension-less paths are checked when the data is read
              DataConfig(dataset="org/name"), DataConfig(dataset="data/corpus")):
        data.check_config(d)


def test_check_config_bpe_vocab_too_small():
    with pytest.raises(ConfigError, match=r"^data.bpe_vocab_size must be >= 260 with data.tokenizer=bpe, got 259$"):
        data.check_config(DataConfig(tokenizer="bpe", bpe_vocab_size=259))


def test_check_config_unknown_embedded_corpus():
    with pytest.raises(ConfigError) as info:
        data.check_config(DataConfig(dataset="embedded:nothing"))
    assert str(info.value) == ("data.dataset: unknown embedded corpus 'embedded:nothing'; known: embedded:stdlib, "
                               "embedded:stdlib-docs")


@pytest.mark.parametrize("spec", ["./missing", "/no/such/moe/dir", "~/no_such_moe_dir/x", "corpus.txt", "a.md",
                                  "d.json", "d.jsonl", "org/set.parquet"])
def test_check_config_missing_local_dataset(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        data.check_config(DataConfig(dataset=spec))
    assert str(info.value) == f"data.dataset: file not found: {spec}"


@pytest.mark.parametrize("sources,message", [
    ([("a", "embedded:stdlib", 0.0)], r"data.sources\[0\] \('a'\): weight must be a finite number > 0, got 0.0"),
    ([("a", "embedded:stdlib", -1.0)], r"data.sources\[0\] \('a'\): weight must be a finite number > 0, got -1.0"),
    ([("a", "embedded:stdlib", float("nan"))], r"weight must be a finite number > 0, got nan"),
    ([("a", "embedded:stdlib", 1.0), ("a", "embedded:stdlib", 1.0)],
     r"data.sources\[1\] \('a'\): the name 'a' is used twice"),
    ([("", "embedded:stdlib", 1.0)], r"data.sources\[0\]: name must be non-empty"),
    ([("a/b", "embedded:stdlib", 1.0)], r"name must be non-empty letters, digits"),
    ([("a", "", 1.0)], r"data.sources\[0\] \('a'\): no dataset"),
    ([("a", "./no/such.txt", 1.0)], r"data.sources\[0\] \('a'\).dataset: file not found: ./no/such.txt"),
    ([("a", "embedded:nope", 1.0)], r"data.sources\[0\] \('a'\).dataset: unknown embedded corpus"),
])
def test_check_config_bad_sources(sources, message):
    d = DataConfig(sources=[DataSourceConfig(name=n, dataset=ds, weight=w) for n, ds, w in sources])
    with pytest.raises(ConfigError, match=message):
        data.check_config(d)


def test_check_config_sources_need_one_tokenizer():
    d = DataConfig(tokenizer="bpe", sources=[DataSourceConfig(name="a", dataset="embedded:stdlib")])
    with pytest.raises(ConfigError, match="data.sources: a mixture needs one tokenizer"):
        data.check_config(d)
    # with sources, data.dataset is unused: not checked
    data.check_config(DataConfig(dataset="./gone.txt", sources=[DataSourceConfig(name="a", dataset="embedded:stdlib")]))
