"""`moe report DIR...`: group sweep runs by their swept values, average over seeds, plot and tabulate.

Accepts sweep folders (holding sweep.json, written by `moe sweep`) and plain run folders (each its
own group). Writes report.md, report.json and PNG plots. Failed or unfinished runs appear in the
report as such, never silently dropped.

Public API: :func:`build_report`, and the steps it is made of: :func:`collect` (the runs, grouped)
and :func:`summarise` (one report row per group); :class:`Group`, :class:`Member`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from moe.analysis import domain, downstream, plots
from moe.analysis.runs import SWEEP_FILE, ReportError, RunRecord, load_run
from moe.analysis.tables import fmt_fixed, format_value, markdown_table
from moe.analysis.wandb_summary import log_report

__all__ = ["Member", "Group", "collect", "summarise", "build_report"]

MARKDOWN_FILE = "report.md"
JSON_FILE = "report.json"
SEED_KEY = "run.seed"  # averaged over, never a group key

# The per-group curves: file name -> (kind of line, key, x, y label, title, log x).
_CURVES = {
    plots.VAL_LOSS_VS_TOKENS: ("eval", "loss/val", "tokens", "val loss", "validation loss vs tokens", False),
    plots.VAL_LOSS_VS_FLOPS: ("eval", "loss/val", "flops", "val loss", "validation loss vs training FLOPs", True),
    plots.TOKENS_PER_S: ("train", "speed/tokens_per_s", "tokens", "tokens/s", "throughput", False),
}
_TABLE_HEAD = ["variant", "seeds", "val loss (mean ± std)", "train loss", "params active", "params total",
               "tokens", "tokens/s", "load max/mean", "dropped"]


@dataclass
class Member:
    name: str
    path: str
    values: Dict[str, Any]
    status: str
    record: Optional[RunRecord] = None


@dataclass
class Group:
    label: str
    values: Dict[str, Any]
    members: List[Member] = field(default_factory=list)

    @property
    def finished(self) -> List[Member]:
        return [m for m in self.members if m.status == "finished" and m.record is not None]

    def finished_records(self) -> List[RunRecord]:
        return [m.record for m in self.finished]


def build_report(dirs: List[str], out_dir: str, wandb_summary: bool = False) -> str:
    """Write report.md, report.json and the plots of the runs in ``dirs`` into ``out_dir``; with
    ``wandb_summary``, also log them to a W&B summary run. Returns report.md's text. Raises
    :class:`ReportError` naming a folder that is neither a sweep nor a run folder."""
    groups, swept = collect(dirs)
    os.makedirs(out_dir, exist_ok=True)
    rows = [summarise(g) for g in groups]
    _write_plots(groups, rows, swept, out_dir)
    _, sources_md = domain.section([(g.label, g.finished_records()) for g in groups], out_dir)  # data mixtures
    text = _markdown(dirs, rows, _png_files(out_dir))
    if sources_md:  # before the plots: the part of report.md the terminal shows
        text = text.replace("\n## Plots\n", "\n" + "\n".join(sources_md) + "\n## Plots\n", 1)
    _write_report_files(out_dir, text, rows)
    if wandb_summary:
        log_report(rows, out_dir, _wandb_group(dirs, out_dir))
    return text


# --------------------------------------------------------------------------------- reading the runs


def _label(values: Dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in values.items()) or "base"


def _read_manifest(sweep_dir: str) -> Dict[str, Any]:
    with open(os.path.join(sweep_dir, SWEEP_FILE)) as f:
        return json.load(f)


def _sweep_member(sweep_dir: str, entry: Dict[str, Any]) -> Member:
    """One run of a sweep.json: its status as the manifest has it, unless the run folder says it
    finished (or the manifest says it never ran); no record when its folder cannot be read."""
    path = os.path.join(sweep_dir, entry["name"])
    status = entry.get("status") or "not run"
    record = None
    if os.path.isdir(path):
        try:
            record = load_run(path)
            if status == "not run" or record.status == "finished":
                status = record.status or status
        except ReportError:
            record = None
    return Member(entry["name"], path, entry["values"], status, record)


def _collect_sweep(sweep_dir: str, groups: Dict[str, Group], swept: List[str]) -> None:
    spec = _read_manifest(sweep_dir)
    for k in spec.get("swept_keys", []):
        if k != SEED_KEY and k not in swept:
            swept.append(k)
    for entry in spec["runs"]:
        values = {k: v for k, v in entry["values"].items() if k != SEED_KEY}
        label = _label(values)
        group = groups.setdefault(label, Group(label, values))
        group.members.append(_sweep_member(sweep_dir, entry))


def collect(dirs: List[str]) -> Tuple[List[Group], List[str]]:
    """Groups of runs (by swept values without the seed) and the swept keys."""
    groups: Dict[str, Group] = {}
    swept: List[str] = []
    for d in dirs:
        if os.path.isfile(os.path.join(d, SWEEP_FILE)):
            _collect_sweep(d, groups, swept)
        else:
            record = load_run(d)  # raises ReportError naming a folder that is not a run
            label = record.name
            group = groups.setdefault(label, Group(label, {}))
            group.members.append(Member(record.name, d, {}, record.status or "unknown", record))
    if not groups:
        raise ReportError("no runs found in " + ", ".join(dirs))
    return list(groups.values()), swept


# -------------------------------------------------------------------------------- one row per group


def _mean_std(values: List[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None, None, 0
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0), len(xs)


def summarise(group: Group) -> Dict[str, Any]:
    """The report row of a group: means (and sample std) over its finished runs, the run-size
    numbers of its first finished run, and the (name, status) of its runs that did not finish."""
    recs = group.finished_records()
    row: Dict[str, Any] = {"variant": group.label, **group.values, "runs": len(group.members),
                           "finished": len(recs)}
    for key in ("val_loss", "train_loss", "tokens_per_s"):
        mean, std, n = _mean_std([r.stats.get(key) for r in recs])
        row[key], row[key + "_std"] = mean, std
    for key in ("params_total", "params_active", "flops_per_token", "tokens"):
        vals = [r.stats.get(key) for r in recs if r.stats.get(key) is not None]
        row[key] = vals[0] if vals else None
    row["load_max_over_mean"] = _mean_std([r.last_router_mean("/max_over_mean") for r in recs])[0]
    row["dropped_frac"] = _mean_std([r.last_router_mean("/dropped_frac") for r in recs])[0]
    row["failed"] = [(m.name, m.status) for m in group.members if m.status != "finished"]
    row["downstream"] = downstream.row_values(recs)
    return row


# ------------------------------------------------------------------------------------------- plots


def _write_plots(groups: List[Group], rows: List[Dict[str, Any]], swept: List[str], out_dir: str) -> None:
    line_colors = plots.colors(len(groups))
    curves = [(g.label, g.finished_records()) for g in groups]
    for fname, (kind, key, x, ylabel, title, logx) in _CURVES.items():
        plots.plot_group_curves(curves, line_colors, os.path.join(out_dir, fname), kind, key, x, ylabel,
                                title, logx)
    plots.plot_load_balance(curves, line_colors, os.path.join(out_dir, plots.LOAD_BALANCE_FILE))
    downstream.write_plots(curves, out_dir)
    for key in swept:
        if any(key in r for r in rows):
            fname = f"final_val_loss_by_{key.split('.')[-1]}.png"
            plots.plot_final_val_loss_by(rows, key, os.path.join(out_dir, fname))
    # expert load of each MoE variant's first finished run
    moe_runs = [(g.label, g.finished[0].record, g.finished[0].record.moe_layers())
                for g in groups if g.finished and g.finished[0].record.moe_layers()]
    if moe_runs:
        plots.plot_expert_load(moe_runs, os.path.join(out_dir, plots.EXPERT_LOAD_FILE))


def _png_files(out_dir: str) -> List[str]:
    return sorted(f for f in os.listdir(out_dir) if f.endswith(".png"))


# ---------------------------------------------------------------------------------------- markdown


def _table_row(r: Dict[str, Any], best: Optional[float]) -> List[str]:
    val = f"{fmt_fixed(r['val_loss'])} ± {fmt_fixed(r['val_loss_std'])}" if r["val_loss"] is not None else "-"
    if best is not None and r["val_loss"] == best:
        val = f"**{val}**"
    return [r["variant"].replace("|", "\\|"), f"{r['finished']}/{r['runs']}", val, fmt_fixed(r["train_loss"]),
            format_value(r["params_active"], "count"), format_value(r["params_total"], "count"),
            format_value(r["tokens"], "count"), format_value(r["tokens_per_s"], "count"),
            fmt_fixed(r["load_max_over_mean"], 2), fmt_fixed(r["dropped_frac"], 3)]


def _failed_section(rows: List[Dict[str, Any]]) -> List[str]:
    failed = [(r["variant"], n, status) for r in rows for n, status in r["failed"]]
    if not failed:
        return []
    lines = ["## Failed or unfinished runs", ""]
    for variant, name, status in failed:
        lines.append(f"- `{name}` ({variant}): {status}; its log is in the sweep folder (`{name}.log`, or "
                     f"`logs/slurm-<job>_<task>.out` for a Slurm array, job and task in {SWEEP_FILE})")
    return lines + [""]


def _markdown(dirs: List[str], rows: List[Dict[str, Any]], png_files: List[str]) -> str:
    best = min((r["val_loss"] for r in rows if r["val_loss"] is not None), default=None)
    lines = ["# Sweep report", "", "Sources: " + ", ".join(f"`{d}`" for d in dirs), ""]
    lines += [markdown_table(_TABLE_HEAD, [_table_row(r, best) for r in rows]), ""]
    lines += _failed_section(rows)
    lines += downstream.markdown_section(downstream.values_table([(r["variant"], r["downstream"]) for r in rows],
                                                                 "variant"))
    lines += ["Seeds are averaged per variant; ± is the sample standard deviation over seeds "
              "(0 with one seed). Load max/mean and dropped fraction are the last logged values, "
              "averaged over MoE layers and seeds.", "", "## Plots", ""]
    for fname in png_files:
        lines += [f"### {fname[:-4].replace('_', ' ')}", "", f"![{fname}]({fname})", ""]
    return "\n".join(lines)


def _write_report_files(out_dir: str, text: str, rows: List[Dict[str, Any]]) -> None:
    with open(os.path.join(out_dir, MARKDOWN_FILE), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, JSON_FILE), "w") as f:
        json.dump(rows, f, indent=2, default=str)


def _wandb_group(dirs: List[str], out_dir: str) -> str:
    """The W&B group of the summary run: the first sweep's name, else the output folder's name."""
    sweep_names = [_read_manifest(d)["name"] for d in dirs if os.path.isfile(os.path.join(d, SWEEP_FILE))]
    return sweep_names[0] if sweep_names else os.path.basename(os.path.normpath(out_dir))
