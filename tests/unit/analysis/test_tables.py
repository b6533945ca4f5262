"""Tests for moe.analysis.tables: number formats and markdown tables."""
from __future__ import annotations

import math

import pytest

from moe.analysis.tables import (
    DERIVED_MARK,
    MISSING,
    fmt_count,
    fmt_duration,
    fmt_fixed,
    fmt_sci,
    format_value,
    markdown_table,
    md_escape,
)


@pytest.mark.parametrize("x, text", [
    (0, "0"), (123, "123"), (12.5, "12.5"), (999, "999"), (1000, "1.00K"), (1234, "1.23K"),
    (81_920, "81.9K"), (163_840, "164K"), (999_600, "1.00M"), (1.5e6, "1.50M"), (45_600_000, "45.6M"),
    (123_456_789, "123M"), (7e9, "7.00B"), (2e12, "2.00T"), (3e15, "3.00Q"), (-1234, "-1.23K"),
    (math.inf, "inf"), (math.nan, "nan"),
])
def test_fmt_count(x, text):
    assert fmt_count(x) == text


@pytest.mark.parametrize("x, text", [
    (0, "0"), (4.5e13, "4.50e13"), (6e8, "6.00e8"), (1.5e-5, "1.50e-5"), (12.34, "12.3"), (0.001, "0.001"),
    (math.inf, "inf"),
])
def test_fmt_sci(x, text):
    assert fmt_sci(x) == text


@pytest.mark.parametrize("s, text", [
    (0, "0.0s"), (12.34, "12.3s"), (60, "1m 00s"), (125, "2m 05s"), (3725, "1h 02m"), (90_000, "1d 01h"),
    (math.nan, "nan"),
])
def test_fmt_duration(s, text):
    assert fmt_duration(s) == text


def test_fmt_fixed():
    assert fmt_fixed(None) == MISSING == "-"
    assert fmt_fixed(2.0) == "2.0000" and fmt_fixed(1.23456, 2) == "1.23"
    assert fmt_fixed(3) == "3" and fmt_fixed("x") == "x"


@pytest.mark.parametrize("value, kind, text", [
    (None, "count", "-"), ("moe", "text", "moe"), ("a|b", "count", "a\\|b"), (5, "text", "5"),
    ([1], "count", "[1]"), (True, "count", "True"), (1234, "count", "1.23K"), (6e8, "sci", "6.00e8"),
    (40, "int", "40"), (12_345.0, "int", "12,345"), (2.5, "int", "2.5"), (2.34567, "loss", "2.3457"),
    (math.nan, "loss", "nan"), (29.981, "ppl", "29.98"), (3e5, "ppl", "3.00e5"), (3725, "duration", "1h 02m"),
    (7, "other", "7"),
])
def test_format_value(value, kind, text):
    assert format_value(value, kind) == text


def test_md_escape_and_marks():
    assert md_escape("a | b\nc") == "a \\| b c"
    assert DERIVED_MARK == "\u2020"


def test_markdown_table():
    assert markdown_table(["run", "type", "tokens", "steps"], [["a", "moe", "1K", "3"]], right_from=2) == (
        "| run | type | tokens | steps |\n|---|---|---:|---:|\n| a | moe | 1K | 3 |")
    assert markdown_table(["x", "y"], []) == "| x | y |\n|---|---|"
