"""Tests of moe/data/formats.py: JSON lines, JSON and parquet files as documents, and the one-line
DataError naming the file, line or column of a bad one (CPU, in-process, a few seconds, no network)."""
from __future__ import annotations

import json

import pytest

from moe import data
from moe.config import DataConfig
from moe.errors import DataError
from tests.helpers import data_cfg, make_doc, prepare_fails, split_docs, text_of, write_jsonl


def write_parquet(path, columns: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), str(path))
    return str(path)


def test_prepare_data_jsonl(tmp_path):
    rows = [{"id": i, "body": make_doc(i)} for i in range(30)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    cfg = DataConfig(dataset=str(path), text_field="body", cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    td = data.prepare_data(cfg)
    got = split_docs(td.train, td.tokenizer) + split_docs(td.val, td.tokenizer)
    assert sorted(got) == sorted(r["body"] for r in rows)

    with pytest.raises(ValueError, match=r"no field 'text'.*available columns: id, body"):
        data.prepare_data(DataConfig(dataset=str(path), cache_dir=str(tmp_path / "cache")))


def test_prepare_data_parquet_in_mixed_folder(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_parquet(folder / "a.parquet", {"text": [make_doc(i) for i in range(10)]})
    (folder / "b.md").write_text(make_doc(99), encoding="utf-8")
    td = data.prepare_data(DataConfig(dataset=str(folder), cache_dir=str(tmp_path / "c"), val_fraction=0.2))
    got = split_docs(td.train, td.tokenizer) + split_docs(td.val, td.tokenizer)
    assert sorted(got) == sorted([make_doc(i) for i in range(10)] + [make_doc(99)])


# ------------------------------------------------------------------------- no data.text_field column


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "json_list", "json_columns"])
def test_missing_text_column(tmp_path, fmt):
    bodies = [text_of(i) for i in range(20)]
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "body": b} for i, b in enumerate(bodies)])
    elif fmt == "parquet":
        path = write_parquet(tmp_path / "d.parquet", {"id": list(range(20)), "body": bodies})
    elif fmt == "json_list":
        path = str(tmp_path / "d.json")
        json.dump([{"id": i, "body": b} for i, b in enumerate(bodies)], open(path, "w"), indent=1)
    else:
        path = str(tmp_path / "d.json")
        json.dump({"id": list(range(20)), "body": bodies}, open(path, "w"), indent=1)
    prepare_fails(data_cfg(tmp_path, path), path, "no field 'text' (data.text_field)", "available columns: id, body")
    td = data.prepare_data(data_cfg(tmp_path, path, text_field="body", val_fraction=0.2))  # the right column works
    assert td.train.num_documents + td.val.num_documents == 20


def test_missing_column_in_a_later_file_of_a_folder(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": text_of(i)} for i in range(30)])
    bad = write_parquet(folder / "b.parquet", {"content": ["x", "y"]})
    prepare_fails(data_cfg(tmp_path, folder), bad, "no field 'text'", "available columns: content")


# ----------------------------------------------------------------------------------- a malformed line


@pytest.mark.parametrize("bad_line", [3, 45])  # 45: long after the split plan has seen both sides
def test_malformed_jsonl_line(tmp_path, bad_line):
    rows = [{"text": text_of(i)} for i in range(60)]
    rows[bad_line - 1] = '{"text": "cut off\n'
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prepare_fails(data_cfg(tmp_path, path, val_fraction=0.2), f"{path}: line {bad_line} is not valid JSON",
                  "fix or delete that line")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, ["text", "b"], {"text": "c"}])
    prepare_fails(data_cfg(tmp_path, path), f"{path}: line 2 is a JSON list, not an object")
    with pytest.raises(DataError, match="line 2"):
        data.tokenize_file_for_eval(path, data.ByteTokenizer(), str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()
