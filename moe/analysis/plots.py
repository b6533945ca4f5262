"""The PNG figures of `moe compare` (one line per run) and `moe report` (one line per sweep variant,
mean over seeds), and the drawing helpers they share.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no display) and saved at a fixed
DPI. matplotlib is imported inside the functions that draw, never at module level: importing it
takes a good part of a second, and the `moe` CLI imports this package for commands that draw
nothing.
"""
from __future__ import annotations

import math
import re
import sys
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from moe.analysis.runs import RunRecord, as_number
from moe.analysis.tables import fmt_count

__all__ = [
    "VAL_LOSS_VS_TOKENS",
    "VAL_LOSS_VS_FLOPS",
    "TRAIN_LOSS_VS_TOKENS",
    "TOKENS_PER_S",
    "EXPERT_LOAD_FILE",
    "LOAD_BALANCE_FILE",
    "use_agg_backend",
    "new_figure",
    "save",
    "colors",
    "no_data",
    "human_axis",
    "legend",
    "ema",
    "plot_val_loss",
    "plot_train_loss",
    "plot_throughput",
    "plot_expert_load",
    "plot_group_curves",
    "plot_load_balance",
    "plot_final_val_loss_by",
]

# File names of the figures.
VAL_LOSS_VS_TOKENS = "val_loss_vs_tokens.png"
VAL_LOSS_VS_FLOPS = "val_loss_vs_flops.png"
TRAIN_LOSS_VS_TOKENS = "train_loss_vs_tokens.png"
TOKENS_PER_S = "tokens_per_s.png"
EXPERT_LOAD_FILE = "expert_load.png"
LOAD_BALANCE_FILE = "load_balance.png"

_DPI = 110

# (name, the run, its MoE layers) for plot_expert_load; (label, runs) for the per-group figures.
MoeRun = Tuple[str, RunRecord, List[int]]
GroupRuns = Tuple[str, Sequence[RunRecord]]


# ------------------------------------------------------------------------------------------ helpers


def use_agg_backend() -> None:
    """Figures here are built without pyplot and render with Agg regardless; this only makes sure a
    later pyplot import in a headless CLI process does not try to open a display."""
    import matplotlib  # deferred: CLI start-up time (see the module docstring)

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")


def new_figure(figsize=(7.5, 4.6)):
    from matplotlib.figure import Figure  # deferred: CLI start-up time

    return Figure(figsize=figsize, dpi=_DPI, layout="constrained")


def save(fig, path: str) -> None:
    fig.savefig(path, dpi=_DPI, format="png")


def colors(n: int) -> List[Any]:
    """``n`` distinct line colours (tab10, or tab20 beyond 10; repeating beyond 20)."""
    from matplotlib import colormaps  # deferred: CLI start-up time

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged by any run", transform=ax.transAxes,
            ha="center", va="center", color="0.4")


def human_axis(axis) -> None:
    """Tick labels like 200K / 1.50B instead of 200000 or an offset."""
    from matplotlib.ticker import FuncFormatter  # deferred: CLI start-up time

    axis.set_major_formatter(
        FuncFormatter(lambda v, _p: re.sub(r"\.0+(?=[KMBTQ]?$)", "", fmt_count(v))))


def legend(ax) -> None:
    """A legend, if anything drawn has a label."""
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize="small", framealpha=0.85)


def ema(y: np.ndarray, beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average; NaN/inf inputs are carried over (not averaged)."""
    out = np.empty_like(y)
    acc, weight = 0.0, 0.0
    for i, v in enumerate(y):
        if math.isfinite(v):
            acc = beta * acc + (1 - beta) * v
            weight = beta * weight + (1 - beta)
        out[i] = acc / weight if weight else math.nan
    return out


# ------------------------------------------------------------------------- moe compare: one per run


def plot_val_loss(runs: Sequence[RunRecord], names, line_colors, path: str, x_key: str,
                  t_common: Optional[float]) -> None:
    """Validation loss against ``x_key`` ("tokens", with a marker at ``t_common``, or "flops", log
    scale), one line per run."""
    fig = new_figure()
    ax = fig.add_subplot()
    plotted = False
    for run, name, color in zip(runs, names, line_colors):
        x, y = run.series("eval", "loss/val", x_key)
        keep = x > 0 if x_key == "flops" else np.ones(len(x), bool)
        if not keep.any():
            continue
        order = np.argsort(x[keep], kind="stable")
        ax.plot(x[keep][order], y[keep][order], marker="o", markersize=3, linewidth=1.5,
                color=color, label=name)
        plotted = True
    if x_key == "tokens":
        ax.set_xlabel("tokens")
        human_axis(ax.xaxis)
        ax.set_title("Validation loss vs training tokens")
        if t_common is not None and plotted:
            ax.axvline(t_common, color="0.5", linestyle=":", linewidth=1,
                       label=f"common budget ({fmt_count(t_common)} tokens)")
    else:
        ax.set_xlabel("training FLOPs (cumulative, log scale)")
        ax.set_title("Validation loss vs training compute")
        if plotted:
            ax.set_xscale("log")
    ax.set_ylabel("validation loss")
    ax.grid(True, alpha=0.3)
    if not plotted:
        no_data(ax, "eval (loss/val) lines")
    legend(ax)
    save(fig, path)


def plot_train_loss(runs: Sequence[RunRecord], names, line_colors, path: str) -> None:
    """Training loss against tokens, one line per run (EMA-smoothed from 20 points on)."""
    fig = new_figure()
    ax = fig.add_subplot()
    plotted = smoothed = False
    for run, name, color in zip(runs, names, line_colors):
        x, y = run.series("train", "loss/train", "tokens")
        if not len(x):
            continue
        if len(x) >= 20:
            ax.plot(x, y, color=color, linewidth=0.8, alpha=0.25)
            ax.plot(x, ema(y, 0.9), color=color, linewidth=1.6, label=name)
            smoothed = True
        else:
            ax.plot(x, y, color=color, linewidth=1.5, marker=".", label=name)
        plotted = True
    ax.set_xlabel("tokens")
    human_axis(ax.xaxis)
    ax.set_ylabel("training loss")
    ax.set_title("Training loss vs tokens" + (" (EMA 0.9; raw values faint)" if smoothed else ""))
    ax.grid(True, alpha=0.3)
    if not plotted:
        no_data(ax, "train (loss/train) lines")
    legend(ax)
    save(fig, path)


def plot_throughput(runs: Sequence[RunRecord], names, line_colors, path: str) -> None:
    """Tokens/s against tokens, one line per run (the summary's average where none was logged)."""
    fig = new_figure()
    ax = fig.add_subplot()
    plotted = False
    for run, name, color in zip(runs, names, line_colors):
        x, y = run.series("train", "speed/tokens_per_s", "tokens")
        if len(x):
            ax.plot(x, y, color=color, linewidth=1.5, label=name)
            plotted = True
        elif as_number(run.stats.get("tokens_per_s")) is not None:
            # No per-step speed logged: show the run's average as a flat line.
            ax.axhline(float(run.stats["tokens_per_s"]), color=color, linestyle="--",
                       linewidth=1.2, label=f"{name} (summary average)")
            plotted = True
    ax.set_xlabel("tokens")
    human_axis(ax.xaxis)
    ax.set_ylabel("throughput (tokens/s)")
    ax.set_title("Training throughput")
    ax.grid(True, alpha=0.3)
    if plotted:
        ax.set_ylim(bottom=0)
        human_axis(ax.yaxis)
    else:
        no_data(ax, "throughput (speed/tokens_per_s)")
    legend(ax)
    save(fig, path)


# ---------------------------------------------------------------------------- expert load (both)


def _cell_edges(steps: np.ndarray) -> np.ndarray:
    """Cell i spans (steps[i-1], steps[i]]: each load row covers the steps since the previous log."""
    first = steps[0] - (steps[1] - steps[0] if len(steps) > 1 else 1.0)
    if steps[0] > 0:
        first = max(first, 0.0)  # the first interval starts at step 0 at the earliest
    return np.concatenate([[first], steps])


def _expert_load_panel(ax, name: str, layer: int, steps: np.ndarray, mat: np.ndarray, vmax: float):
    """One layer's heatmap (experts down, steps across); returns the mesh for the colour bar."""
    order = np.argsort(steps, kind="stable")
    steps, mat = steps[order], mat[order]
    keep = np.append(steps[1:] != steps[:-1], True)  # strictly increasing edges
    steps, mat = steps[keep], mat[keep]
    y_edges = np.arange(mat.shape[1] + 1) - 0.5
    mesh = ax.pcolormesh(_cell_edges(steps), y_edges, mat.T, cmap="viridis",
                         vmin=0.0, vmax=vmax, shading="flat")
    ax.invert_yaxis()
    ax.set_title(f"{name} \u2014 layer {layer}", fontsize="small")
    ax.set_xlabel("step", fontsize="small")
    ax.set_ylabel("expert", fontsize="small")
    ax.tick_params(labelsize="x-small")
    if mat.shape[1] <= 16:
        ax.set_yticks(range(mat.shape[1]))
    return mesh


def plot_expert_load(moe_runs: Sequence[MoeRun], path: str) -> None:
    """One row block per MoE run, one panel per MoE layer (wrapped at 4 per row)."""
    ncols = min(4, max(len(layers) for _, _, layers in moe_runs))
    row_blocks = [math.ceil(len(layers) / ncols) for _, _, layers in moe_runs]
    nrows = sum(row_blocks)
    fig = new_figure(figsize=(2.2 + 3.3 * ncols, 0.6 + 2.5 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    row = 0
    for (name, run, layers), nblock in zip(moe_runs, row_blocks):
        block_axes = [ax for r in range(row, row + nblock) for ax in axes[r]]
        data = [run.expert_load(layer) for layer in layers]
        vmax = max((np.nanmax(m) for _, m in data if m.size and np.isfinite(m).any()), default=1.0)
        mesh = None
        n_exp = 0
        for ax, layer, (steps, mat) in zip(block_axes, layers, data):
            n_exp = max(n_exp, mat.shape[1])
            mesh = _expert_load_panel(ax, name, layer, steps, mat, vmax)
        for ax in block_axes[len(layers):]:
            ax.set_visible(False)
        if mesh is not None:
            uniform = f"; uniform = 1/{n_exp} = {1 / n_exp:.3g}" if n_exp else ""
            cbar = fig.colorbar(mesh, ax=block_axes[: len(layers)], shrink=0.9, pad=0.01)
            cbar.set_label(f"fraction of tokens{uniform}", fontsize="x-small")
            cbar.ax.tick_params(labelsize="x-small")
        row += nblock
    fig.suptitle("Expert load: fraction of routed tokens per expert over each logging interval",
                 fontsize="medium")
    save(fig, path)


# ---------------------------------------------------------------- moe report: one per sweep variant


def _mean_curve(recs: Sequence[RunRecord], kind: str, key: str,
                x: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    curves = [r.series(kind, key, x) for r in recs]
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return np.array([]), np.array([]), np.array([])
    n = min(len(c[0]) for c in curves)  # seeds share eval points; cut to the shortest
    xs = curves[0][0][:n]
    ys = np.stack([c[1][:n] for c in curves])
    return xs, ys.mean(0), ys.std(0)


def plot_group_curves(groups: Sequence[GroupRuns], line_colors, path: str, kind: str, key: str,
                      x: str, ylabel: str, title: str, logx: bool = False) -> None:
    """``key`` of the ``kind`` ("train"/"eval") lines against ``x``: per group the mean over its
    runs, with a ±1 std band when it has more than one."""
    fig = new_figure()
    ax = fig.add_subplot()
    for (label, recs), color in zip(groups, line_colors):
        xs, mean, std = _mean_curve(recs, kind, key, x)
        if not len(xs):
            continue
        ax.plot(xs, mean, marker="o" if kind == "eval" else None, ms=3, color=color, label=label)
        if len(recs) > 1:
            ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.15)
    ax.set_xlabel("training FLOPs" if x == "flops" else "tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logx:
        ax.set_xscale("log")
    else:
        human_axis(ax.xaxis)
    ax.grid(alpha=0.3)
    legend(ax)
    save(fig, path)


def plot_load_balance(groups: Sequence[GroupRuns], line_colors, path: str) -> None:
    """Expert load max/mean (mean over MoE layers) against tokens, one line per run, coloured by
    group (the group's first run opaque, the others faint)."""
    fig = new_figure()
    ax = fig.add_subplot()
    for (label, recs), color in zip(groups, line_colors):
        for i, rec in enumerate(recs):
            xs, ys = rec.router_mean_series("/max_over_mean")
            if xs:
                ax.plot(xs, ys, color=color, alpha=0.9 if i == 0 else 0.4,
                        label=label if i == 0 else None)
    ax.axhline(1.0, color="0.5", ls=":", lw=1)
    ax.set_xlabel("tokens")
    ax.set_ylabel("expert load max/mean (mean over MoE layers)")
    ax.set_title("load balance over training (1 = perfectly balanced)")
    human_axis(ax.xaxis)
    ax.grid(alpha=0.3)
    legend(ax)
    save(fig, path)


def plot_final_val_loss_by(rows: Sequence[dict], key: str, path: str) -> None:
    """Final val loss (mean ± std, from the report rows) of each variant against its value of the
    swept ``key``, values in order of first appearance."""
    fig = new_figure((6.5, 4.2))
    ax = fig.add_subplot()
    labels = [str(r.get(key)) for r in rows]
    order = sorted(set(labels), key=labels.index)
    xs = [order.index(l) for l in labels]
    ys = [r["val_loss"] if r["val_loss"] is not None else math.nan for r in rows]
    errs = [r["val_loss_std"] or 0.0 for r in rows]
    ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=3)
    for x, y, r in zip(xs, ys, rows):
        ax.annotate(r["variant"], (x, y), fontsize=6, alpha=0.7, xytext=(4, 2),
                    textcoords="offset points")
    ax.set_xticks(range(len(order)), order)
    ax.set_xlabel(key)
    ax.set_ylabel("final val loss (mean ± std over seeds)")
    ax.set_title(f"final val loss by {key.split('.')[-1]}")
    ax.grid(alpha=0.3)
    save(fig, path)
