"""Markdown tables and the number formats of the reports (`moe compare`, `moe report`).

``format_value(value, kind)`` formats one table cell; the kinds are ``text``, ``count`` (1.23K,
45.6M), ``sci`` (4.50e13), ``int`` (1,234), ``loss`` (4 decimals), ``ppl`` (2 decimals) and
``duration`` (1h 02m). A missing value is :data:`MISSING`.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from moe.analysis.runs import as_number

__all__ = [
    "MISSING",
    "DERIVED_MARK",
    "fmt_count",
    "fmt_sci",
    "fmt_duration",
    "fmt_fixed",
    "format_value",
    "md_escape",
    "markdown_table",
]

MISSING = "-"
DERIVED_MARK = "\u2020"  # dagger: value taken from metrics.jsonl, not summary.json


def fmt_count(x: float) -> str:
    """1234 -> 1.23K, 1.5e6 -> 1.50M, 7e9 -> 7.00B, 123 -> 123; three significant digits."""
    if not math.isfinite(x):
        return str(x)
    sign = "-" if x < 0 else ""
    x = abs(x)
    if x < 1000:
        return sign + (f"{x:.0f}" if float(x).is_integer() else f"{x:.3g}")
    for scale, suffix in ((1e15, "Q"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if x >= scale * 0.9995 or suffix == "K":
            v = x / scale
            text = f"{v:.3g}" if v >= 100 else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")
            return f"{sign}{text}{suffix}"
    return sign + str(x)  # unreachable


def fmt_sci(x: float) -> str:
    """4.5e13 -> '4.50e13' (no '+' or leading zeros in the exponent)."""
    if not math.isfinite(x):
        return str(x)
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.3g}"
    mant, exp = f"{x:.2e}".split("e")
    return f"{mant}e{int(exp)}"


def fmt_duration(s: float) -> str:
    """12.3 -> '12.3s', 125 -> '2m 05s', 3725 -> '1h 02m', 90000 -> '1d 01h'."""
    if not math.isfinite(s):
        return str(s)
    if s < 60:
        return f"{s:.1f}s"
    s = int(round(s))
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    if d:
        return f"{d}d {h:02d}h"
    if h:
        return f"{h}h {m:02d}m"
    return f"{m}m {sec:02d}s"


def fmt_fixed(v: Any, digits: int = 4) -> str:
    """A float with ``digits`` decimals, None as "-", anything else as str()."""
    if v is None:
        return MISSING
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def md_escape(text: str) -> str:
    """Text safe inside a markdown table cell or list item (pipes escaped, one line)."""
    return text.replace("|", "\\|").replace("\n", " ")


def format_value(value: Any, kind: str) -> str:
    """One table cell: ``value`` in the format ``kind`` (see the module docstring)."""
    if value is None:
        return MISSING
    if kind == "text" or isinstance(value, str):
        return md_escape(str(value))
    x = as_number(value)
    if x is None:
        return md_escape(str(value))
    if kind == "count":
        return fmt_count(x)
    if kind == "sci":
        return fmt_sci(x)
    if kind == "int":
        return f"{int(x):,}" if math.isfinite(x) and x.is_integer() else f"{x:g}"
    if kind == "loss":
        return f"{x:.4f}" if math.isfinite(x) else str(x)
    if kind == "ppl":
        return f"{x:.2f}" if math.isfinite(x) and x < 1e5 else fmt_sci(x)
    if kind == "duration":
        return fmt_duration(x)
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                   right_from: Optional[int] = None) -> str:
    """A markdown table of already formatted cells; columns from index ``right_from`` on are
    right-aligned (none when it is None)."""
    align = ["---" if right_from is None or i < right_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
