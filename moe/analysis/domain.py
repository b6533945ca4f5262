"""Data mixtures in the reports: per-source validation loss (`loss/val/<source>`) and routing by domain
(`router/layer{L}/domain`, `router/layer{L}/specialisation`, `router/domain_sources`, logged by the
training loop for a run on `data.sources`; moe/metrics/domain.py). `moe compare` and `moe report`
tabulate each run's (or variant's) last values and draw the last logged sources x experts matrix of
every MoE layer as a heatmap (`routing_by_domain.png`)."""
from __future__ import annotations

import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from moe.analysis import plots
from moe.analysis.runs import RunRecord, as_number
from moe.analysis.tables import MISSING, markdown_table, md_escape

PLOT_FILE = "routing_by_domain.png"
_VAL = re.compile(r"^loss/val/(.+)$")
_SPEC = re.compile(r"^router/layer(\d+)/specialisation$")

Groups = Sequence[Tuple[str, Sequence[RunRecord]]]
"""(label, runs): one run per label in `moe compare`, a variant's seeds in `moe report`."""


def _last(lines: Sequence[dict], key: str):
    for line in reversed(lines):
        if key in line:
            return line[key]
    return None


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def table(groups: Groups) -> str:
    """Per label: the last val loss of each source and the last specialisation of each layer (seed means);
    empty when no run mixed sources."""
    runs = [r for _, rs in groups for r in rs]
    sources = sorted({m.group(1) for r in runs for line in r.evals for k in line if (m := _VAL.match(k))})
    layers = sorted({int(m.group(1)) for r in runs for line in r.train for k in line if (m := _SPEC.match(k))})
    if not sources and not layers:
        return ""
    rows = []
    for label, rs in groups:
        vals = [_mean([as_number(_last(r.evals, f"loss/val/{s}")) for r in rs]) for s in sources]
        specs = [_mean([as_number(_last(r.train, f"router/layer{L}/specialisation")) for r in rs]) for L in layers]
        rows.append([md_escape(label)] + [MISSING if v is None else f"{v:.4f}" for v in vals + specs])
    headers = ["run"] + [f"val loss {md_escape(s)}" for s in sources] + [f"specialisation L{L}" for L in layers]
    return markdown_table(headers, rows, right_from=1)


def _matrices(run: RunRecord) -> Dict[int, Tuple[np.ndarray, float]]:
    out = {}
    for line in reversed(run.train):
        for key, value in line.items():
            m = re.match(r"^router/layer(\d+)/domain$", key)
            if m and int(m.group(1)) not in out:
                out[int(m.group(1))] = (np.asarray(value, dtype=float),
                                        float(line.get(f"router/layer{m.group(1)}/specialisation", float("nan"))))
        if out:
            return out
    return out


def write_plot(groups: Groups, out_dir: str) -> Optional[str]:
    """routing_by_domain.png: for the first run of each label that logged it, one heatmap per MoE layer
    (sources down, experts across, colour = share of the source's routed tokens). None when no run did."""
    panels = []
    for label, rs in groups:
        for r in rs:
            mats = _matrices(r)
            if mats:
                names = _last(r.train, "router/domain_sources") or []
                panels += [(label, L, mat, spec, names) for L, (mat, spec) in sorted(mats.items())]
                break
    path = os.path.join(out_dir, PLOT_FILE)
    if not panels:
        if os.path.exists(path):
            os.remove(path)  # stale, from an earlier report into the same folder
        return None
    fig = plots.new_figure(figsize=(7.5, 1.0 + 1.2 * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (label, layer, mat, spec, names) in zip(axes, panels):
        im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0)
        ax.set_yticks(range(mat.shape[0]), labels=[str(n) for n in names] if len(names) == mat.shape[0] else None)
        ax.set_title(f"{label} layer {layer}: specialisation {spec:.3f}", fontsize=9)
        fig.colorbar(im, ax=ax, label="share")
    axes[-1].set_xlabel("expert")
    plots.save(fig, path)
    return PLOT_FILE


def markdown_section(table_md: str, plot_file: Optional[str]) -> List[str]:
    if not table_md:
        return []
    md = ["## Data sources", "", "Last validation loss per source; specialisation = I(source; expert) / "
          "H(source) of the routed tokens in the last logged window (0: every source uses the experts alike, "
          "1: the expert tells the source).", "", table_md, ""]
    if plot_file:
        md += [f"### [Routing by domain]({plot_file})", "", f"![Routing by domain]({plot_file})", ""]
    return md


def section(groups: Groups, out_dir: str) -> Tuple[str, List[str]]:
    """(the table for the terminal, the markdown section) of a report; writes the plot."""
    table_md = table(groups)
    plot_file = write_plot(groups, out_dir)  # also removes a stale one when no run mixed sources
    return table_md, markdown_section(table_md, plot_file)
