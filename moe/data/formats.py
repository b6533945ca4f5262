"""Local files as documents: plain text, JSON lines, JSON and parquet readers.

Plain text is one document per file; json, jsonl and parquet one document per record (the
`data.text_field` of each). A malformed line or a missing text column raises `DataError` naming the
file, line and column.
"""
from __future__ import annotations

import json
from typing import Iterable, Iterator, List

from moe.errors import DataError

# Local files we know how to read in a folder. Plain text is one document per file; json, jsonl and
# parquet one document per record. A single file of any other type (or none) is read as plain text.
_PLAIN_TEXT_EXTS = (".txt", ".md")
_JSON_EXTS = (".json", ".jsonl")
_PARQUET_EXTS = (".parquet",)
_SUPPORTED_EXTS = _PLAIN_TEXT_EXTS + _JSON_EXTS + _PARQUET_EXTS


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


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line, shortened: it goes into a one-line error."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
