"""`moe compare RUN_DIR... --out DIR`: compare finished (or crashed) training runs in one markdown
table plus a handful of PNG plots.

Each run folder is read into a :class:`~moe.analysis.runs.RunRecord` (see moe/analysis/runs.py for
what is read and how missing values are filled in from ``metrics.jsonl``; such values are marked
with a dagger in the table; anything else missing is shown as ``-``). Runs trained on different
numbers of tokens are also compared at the largest token count all of them reached at an eval
point.

Public API: :func:`compare_runs`, and re-exported from moe.analysis.runs: :class:`ReportError`,
:class:`ReportWarning`, :class:`RunRecord`, :func:`load_run`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from moe.analysis import domain, downstream, plots
from moe.analysis.plots import EXPERT_LOAD_FILE
from moe.analysis.runs import (
    METRICS_FILE,
    SUMMARY_FILE,
    ReportError,
    ReportWarning,
    RunRecord,
    as_number,
    load_run,
)
from moe.analysis.tables import DERIVED_MARK, MISSING, fmt_count, format_value, markdown_table, md_escape

__all__ = [
    "ReportError",
    "ReportWarning",
    "RunRecord",
    "load_run",
    "compare_runs",
    "PLOT_FILES",
    "EXPERT_LOAD_FILE",
]

MARKDOWN_FILE = "compare.md"
# Always written, in this order (expert_load.png only when some run logged router loads).
PLOT_FILES = (
    plots.VAL_LOSS_VS_TOKENS,
    plots.VAL_LOSS_VS_FLOPS,
    plots.TRAIN_LOSS_VS_TOKENS,
    plots.TOKENS_PER_S,
)
_PLOT_TITLES = {
    plots.VAL_LOSS_VS_TOKENS: "Validation loss vs tokens",
    plots.VAL_LOSS_VS_FLOPS: "Validation loss vs training FLOPs",
    plots.TRAIN_LOSS_VS_TOKENS: "Training loss vs tokens",
    plots.TOKENS_PER_S: "Throughput (tokens/s)",
    EXPERT_LOAD_FILE: "Expert load per MoE layer",
}

# Table columns that come straight from a run's stats (the optional "val loss at T" column is added
# by _table). Each is (header, stats key, format kind of tables.format_value).
_COLUMNS = (
    ("type", "model_type", "text"),
    ("params total", "params_total", "count"),
    ("params active", "params_active", "count"),
    ("FLOPs/token (training)", "flops_per_token", "sci"),
    ("tokens", "tokens", "count"),
    ("steps", "steps", "int"),
    ("final train loss", "train_loss", "loss"),
    ("final val loss", "val_loss", "loss"),
    ("val ppl", "val_ppl", "ppl"),
    ("tokens/s", "tokens_per_s", "count"),
    ("wall time", "wall_s", "duration"),
)


def compare_runs(run_dirs: List[str], out_dir: str) -> str:
    """Compare runs (in the order given) and write into ``out_dir`` (created if missing):

    * ``val_loss_vs_tokens.png``, ``val_loss_vs_flops.png``, ``train_loss_vs_tokens.png``,
      ``tokens_per_s.png`` -- one line per run;
    * ``expert_load.png`` -- per MoE run and MoE layer, a heatmap of the fraction of tokens each
      expert received over the logged steps; not written (and the markdown says so) when no run
      logged router loads; a stale copy from an earlier comparison in ``out_dir`` is removed;
    * ``compare.md`` -- the table, notes, and links to the plots.

    Returns the markdown table followed by its notes (the part of ``compare.md`` a terminal should
    show). Raises :class:`ReportError` if a folder is not a run folder (before writing anything).
    """
    plots.use_agg_backend()
    runs = _read_runs(run_dirs)
    out_dir = _make_output_folder(out_dir)
    names = _unique_names(runs)
    budget = _token_budget(runs, names)
    table, notes = _table(runs, names, budget)
    moe_runs, no_load = _expert_load_runs(runs, names)
    _write_plots(out_dir, runs, names, budget.t_common, moe_runs)
    groups = [(n, [r]) for n, r in zip(names, runs)]
    tasks_table = downstream.table(groups, downstream.metric_keys(runs))
    tasks_md = downstream.markdown_section(tasks_table, downstream.write_plots(groups, out_dir))
    sources_table, sources_md = domain.section(groups, out_dir)  # data mixtures: per source, routing by domain
    tasks_md = list(tasks_md) + sources_md
    _write_markdown(out_dir, runs, names, table, notes, moe_runs, no_load, tasks_md)
    return (table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
            + (f"\nDownstream tasks (last logged values):\n\n{tasks_table}\n" if tasks_table else "")
            + (f"\nData sources (last logged values):\n\n{sources_table}\n" if sources_table else ""))


# ----------------------------------------------------------------------------------- the run folders


def _read_runs(run_dirs: Sequence[str]) -> List[RunRecord]:
    run_dirs = [os.fspath(d) for d in run_dirs]
    if not run_dirs:
        raise ReportError("no run folders given")
    return [load_run(d) for d in run_dirs]


def _make_output_folder(out_dir: str) -> str:
    out_dir = os.fspath(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ReportError(f"{out_dir}: cannot create output folder ({e})") from e
    return out_dir


def _unique_names(runs: Sequence[RunRecord]) -> List[str]:
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    out, seen = [], {}
    for r in runs:
        label = r.name if names.count(r.name) == 1 else f"{r.name} ({r.path})"
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


# ------------------------------------------------------------------ comparable: the token budgets


@dataclass
class _Budget:
    """How the runs' val losses compare: at their final values when every run trained on the same
    number of tokens, else also at ``t_common`` tokens (``at_t``: each run's val loss there, None
    where it has no eval point); ``notes`` say which."""

    t_common: Optional[float] = None
    at_t: List[Optional[float]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def _eval_curve(run: RunRecord) -> Tuple[np.ndarray, np.ndarray]:
    """Eval points (tokens, val loss) sorted by tokens, finite losses only, one point per token."""
    x, y = run.series("eval", "loss/val", "tokens")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if len(x):
        # Duplicate token counts: keep the last (np.interp needs increasing xp).
        uniq = np.append(x[1:] != x[:-1], True)
        x, y = x[uniq], y[uniq]
    return x, y


def _val_loss_at(x: np.ndarray, y: np.ndarray, t: float) -> Optional[float]:
    if not len(x) or t < x[0] or t > x[-1]:
        return None
    return float(np.interp(t, x, y))


def _token_budget(runs: Sequence[RunRecord], names: Sequence[str]) -> _Budget:
    """Equal token budgets, or compare at the largest token count every run evaluated at."""
    budget = _Budget(at_t=[None] * len(runs))
    token_counts = [as_number(r.stats.get("tokens")) for r in runs]
    if all(t is not None for t in token_counts) and len(set(token_counts)) == 1:
        if len(runs) > 1:
            budget.notes.append(f"All runs trained on the same number of tokens "
                                f"({int(token_counts[0]):,}).")
        return budget
    counts = "; ".join(f"{md_escape(n)}: {int(t):,}" if t is not None else
                       f"{md_escape(n)}: unknown" for n, t in zip(names, token_counts))
    budget.notes.append(f"**val loss compared at different token counts** ({counts}).")
    curves = [_eval_curve(r) for r in runs]
    with_evals = [i for i, (x, _) in enumerate(curves) if len(x)]
    if not with_evals:
        budget.notes.append("No run has an eval point with a finite loss/val in metrics.jsonl, so "
                            "val loss cannot be compared at a common token count.")
        return budget
    t_common = min(float(curves[i][0][-1]) for i in with_evals)
    budget.t_common = t_common
    budget.at_t = [_val_loss_at(x, y, t_common) for x, y in curves]
    lacking = [names[i] for i in range(len(runs)) if i not in with_evals]
    note = (f"The \"val loss at {fmt_count(t_common)} tokens\" column compares every run "
            f"at {int(t_common):,} tokens, the largest token count all runs reached at an "
            f"eval point; values are interpolated linearly between eval points.")
    if lacking:
        note += (f" Runs without a finite eval point in {METRICS_FILE} are left out: "
                 + ", ".join(md_escape(n) for n in lacking) + ".")
    budget.notes.append(note)
    return budget


# ------------------------------------------------------------------------------------------- table


def _best(values: Sequence[Optional[float]]) -> Optional[float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return min(finite) if finite else None


def _row(run: RunRecord, name: str, best_final: Optional[float], several: bool) -> Tuple[List[str], bool]:
    """The table cells of one run from its stats (without the "val loss at T" cell), and whether
    one of them was taken from metrics.jsonl."""
    label = md_escape(name)
    if isinstance(run.status, str) and run.status != "finished":
        label += f" ({md_escape(run.status)})"
    cells, any_derived = [label], False
    for _, key, kind in _COLUMNS:
        text = format_value(run.stats.get(key), kind)
        if key == "val_loss" and best_final is not None and \
                as_number(run.stats.get(key)) == best_final and several:
            text = f"**{text}**"
        if key in run.derived and text != MISSING:
            text += DERIVED_MARK
            any_derived = True
        cells.append(text)
    return cells, any_derived


def _table(runs: Sequence[RunRecord], names: Sequence[str], budget: _Budget) -> Tuple[str, List[str]]:
    """The markdown table (lowest val losses in bold) and the notes to print under it."""
    several = len(runs) > 1
    headers = ["run"] + [h for h, _, _ in _COLUMNS]
    if budget.t_common is not None:
        headers.append(f"val loss at {fmt_count(budget.t_common)} tokens")
    best_final = _best([as_number(r.stats.get("val_loss")) for r in runs])
    best_at_t = _best(budget.at_t)
    any_derived = False
    rows = []
    for run, name, at_t in zip(runs, names, budget.at_t):
        cells, derived = _row(run, name, best_final, several)
        any_derived |= derived
        if budget.t_common is not None:
            text = format_value(at_t, "loss")
            if at_t is not None and at_t == best_at_t and several:
                text = f"**{text}**"
            cells.append(text)
        rows.append(cells)

    notes = list(budget.notes)
    if several and (best_final is not None or best_at_t is not None):
        notes.insert(0, "**Bold**: lowest val loss in the column.")
    if any_derived:
        notes.append(f"{DERIVED_MARK} not in {SUMMARY_FILE}; taken from {METRICS_FILE} (last logged "
                     "value; FLOPs/token = cumulative FLOPs / tokens).")
    notes.append(f"\"{MISSING}\": not recorded by the run.")
    return markdown_table(headers, rows, right_from=2), notes


# ------------------------------------------------------------------------------------------- plots


def _expert_load_runs(runs: Sequence[RunRecord],
                      names: Sequence[str]) -> Tuple[List[plots.MoeRun], List[str]]:
    """(name, run, layers) of the runs that logged router loads, and the names of the MoE runs
    that did not."""
    moe_runs = [(n, r, r.moe_layers()) for n, r in zip(names, runs)]
    moe_runs = [m for m in moe_runs if m[2]]
    no_load = [n for n, r in zip(names, runs) if r.is_moe and not r.moe_layers()]
    return moe_runs, no_load


def _write_plots(out_dir: str, runs: Sequence[RunRecord], names: Sequence[str],
                 t_common: Optional[float], moe_runs: Sequence[plots.MoeRun]) -> None:
    line_colors = plots.colors(len(runs))
    plots.plot_val_loss(runs, names, line_colors, os.path.join(out_dir, plots.VAL_LOSS_VS_TOKENS),
                        "tokens", t_common)
    plots.plot_val_loss(runs, names, line_colors, os.path.join(out_dir, plots.VAL_LOSS_VS_FLOPS),
                        "flops", None)
    plots.plot_train_loss(runs, names, line_colors, os.path.join(out_dir, plots.TRAIN_LOSS_VS_TOKENS))
    plots.plot_throughput(runs, names, line_colors, os.path.join(out_dir, plots.TOKENS_PER_S))
    expert_path = os.path.join(out_dir, EXPERT_LOAD_FILE)
    if moe_runs:
        plots.plot_expert_load(moe_runs, expert_path)
    elif os.path.exists(expert_path):
        os.remove(expert_path)  # stale, from an earlier comparison in the same folder


# ---------------------------------------------------------------------------------------- markdown


def _expert_load_section(moe_runs: Sequence[plots.MoeRun], no_load: Sequence[str]) -> List[str]:
    md = [f"### {_PLOT_TITLES[EXPERT_LOAD_FILE]}", ""]
    no_load_names = ", ".join(md_escape(n) for n in no_load)
    if moe_runs:
        md += [f"[{EXPERT_LOAD_FILE}]({EXPERT_LOAD_FILE})", "",
               f"![{_PLOT_TITLES[EXPERT_LOAD_FILE]}]({EXPERT_LOAD_FILE})", ""]
        if no_load:
            md += [f"MoE runs without router load lines in {METRICS_FILE} (not shown): "
                   + no_load_names + ".", ""]
    elif no_load:
        md += [f"{EXPERT_LOAD_FILE} not written: the MoE runs ("
               + no_load_names + f") logged no router load lines in {METRICS_FILE}.", ""]
    else:
        md += [f"{EXPERT_LOAD_FILE} not written: no run is MoE.", ""]
    return md


def _write_markdown(out_dir: str, runs: Sequence[RunRecord], names: Sequence[str], table: str,
                    notes: Sequence[str], moe_runs: Sequence[plots.MoeRun],
                    no_load: Sequence[str], tasks_md: Sequence[str] = ()) -> None:
    """compare.md: the runs, the table and its notes, the plots, and what was skipped reading."""
    md = ["# Run comparison", "", "Runs, in the order given:", ""]
    md += [f"- **{md_escape(n)}**: `{r.path}`" for n, r in zip(names, runs)]
    md += ["", table, ""]
    md += [f"- {n}" for n in notes]
    md += ["", "## Plots", ""]
    for fname in PLOT_FILES:
        md += [f"### [{_PLOT_TITLES[fname]}]({fname})", "", f"![{_PLOT_TITLES[fname]}]({fname})", ""]
    md += _expert_load_section(moe_runs, no_load)
    md += list(tasks_md)
    run_warnings = [(n, w) for n, r in zip(names, runs) for w in r.warnings]
    if run_warnings:
        md += ["## Warnings", ""] + [f"- {md_escape(n)}: {md_escape(w)}" for n, w in run_warnings]
        md += [""]
    with open(os.path.join(out_dir, MARKDOWN_FILE), "w", encoding="utf-8") as f:
        f.write("\n".join(md))
