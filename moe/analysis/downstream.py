"""Downstream task metrics in the reports: `downstream/<task>/<metric>`, which the training loop logs
on its evaluation lines when `train.eval_tasks` is set (moe/train/downstream.py). `moe compare` and
`moe report` show each run's (or variant's) last values in a table and plot every metric against
tokens and against training FLOPs, one panel per task and metric."""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from moe.analysis import plots
from moe.analysis.runs import RunRecord, as_number
from moe.analysis.tables import MISSING, markdown_table, md_escape

PREFIX = "downstream/"
VS_TOKENS = "downstream_vs_tokens.png"
VS_FLOPS = "downstream_vs_flops.png"
PLOT_FILES = (VS_TOKENS, VS_FLOPS)

Groups = Sequence[Tuple[str, Sequence[RunRecord]]]
"""(label, runs) pairs: one run per label in `moe compare`, a variant's seeds in `moe report`."""


def metric_keys(runs: Sequence[RunRecord]) -> List[str]:
    """Every downstream key any run logged, sorted (task, then metric)."""
    return sorted({k for r in runs for line in r.evals for k in line if k.startswith(PREFIX)})


def last_value(run: RunRecord, key: str) -> Optional[float]:
    """The last logged value of `key` (None if never logged as a finite number)."""
    for line in reversed(run.evals):
        v = as_number(line.get(key))
        if v is not None and math.isfinite(v):
            return v
    return None


def mean_last(runs: Sequence[RunRecord], key: str) -> Optional[float]:
    """The mean over `runs` of their last values of `key` (None if none has one)."""
    values = [v for v in (last_value(r, key) for r in runs) if v is not None]
    return float(np.mean(values)) if values else None


def column(key: str) -> str:
    """`downstream/<task>/<metric>` -> `<task> <metric>` (a table header)."""
    return key[len(PREFIX):].replace("/", " ")


def table(groups: Groups, keys: Sequence[str], first: str = "run") -> str:
    """Markdown: one row per label, one column per downstream key (mean of the last values over the
    label's runs); "" when no run logged any."""
    return values_table([(label, {k: mean_last(runs, k) for k in keys}) for label, runs in groups], first)


def values_table(rows: Sequence[Tuple[str, Dict[str, Optional[float]]]], first: str = "run") -> str:
    """Markdown of (label, {downstream key: value}) rows, one column per key any row has; "" if none."""
    keys = sorted({k for _, values in rows for k in values})
    if not keys:
        return ""
    cells = [[md_escape(label)] + [MISSING if values.get(k) is None else f"{values[k]:.4g}" for k in keys]
             for label, values in rows]
    return markdown_table([first] + [md_escape(column(k)) for k in keys], cells, right_from=1)


def plot(groups: Groups, keys: Sequence[str], line_colors, path: str, x: str) -> None:
    """One panel per key: its value at each evaluation against `x` ("tokens" or "flops"), per label
    the mean over its runs."""
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = plots.new_figure(figsize=(4.2 * ncols, 3.2 * nrows))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for (label, runs), color in zip(groups, line_colors):
            xs, ys = _mean_series(runs, key, x)
            if len(xs):
                ax.plot(xs, ys, marker="o", ms=3, color=color, label=label)
        ax.set_title(column(key), fontsize="medium")
        ax.set_xlabel("training FLOPs" if x == "flops" else "tokens")
        if x == "flops":
            ax.set_xscale("log")
        else:
            plots.human_axis(ax.xaxis)
        ax.grid(alpha=0.3)
        if i == 0:
            plots.legend(ax)
    plots.save(fig, path)


def _mean_series(runs: Sequence[RunRecord], key: str, x: str) -> Tuple[np.ndarray, np.ndarray]:
    curves = [r.series("eval", key, x) for r in runs]
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return np.array([]), np.array([])
    n = min(len(c[0]) for c in curves)  # seeds share evaluation points; cut to the shortest
    return curves[0][0][:n], np.stack([c[1][:n] for c in curves]).mean(0)


def write_plots(groups: Groups, out_dir: str) -> List[str]:
    """downstream_vs_tokens.png and downstream_vs_flops.png when some run logged downstream metrics
    (stale copies removed otherwise); the names of the files written."""
    keys = metric_keys([r for _, runs in groups for r in runs])
    written = []
    for fname, x in zip(PLOT_FILES, ("tokens", "flops")):
        path = os.path.join(out_dir, fname)
        if keys:
            plot(groups, keys, plots.colors(len(groups)), path, x)
            written.append(fname)
        elif os.path.exists(path):
            os.remove(path)
    return written


def row_values(runs: Sequence[RunRecord]) -> Dict[str, Optional[float]]:
    """{downstream key: mean of the last values over `runs`} (for report.json)."""
    return {k: mean_last(runs, k) for k in metric_keys(runs)}


def markdown_section(text: str, written: Sequence[str] = ()) -> List[str]:
    """The "Downstream tasks" section of compare.md / report.md around the table `text` (and the
    plots `written`, when not listed elsewhere); [] without a table."""
    if not text:
        return []
    md = ["## Downstream tasks", "", "Last logged value of each `downstream/<task>/<metric>` "
          "(train.eval_tasks); a variant's seeds averaged.", "", text, ""]
    for fname in written:
        md += [f"![{fname}]({fname})", ""]
    return md
