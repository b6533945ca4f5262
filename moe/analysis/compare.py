"""Compare finished (or crashed) training runs: one markdown table plus a handful of PNG plots.

This is the engine behind ``moe compare RUN_DIR... --out DIR``. It reads what the trainer leaves in
each run folder:

* ``summary.json`` -- final numbers of the run (any key may be missing for a run that died);
* ``metrics.jsonl`` -- one JSON object per log line; train lines carry ``loss/train`` (and, for MoE
  runs, ``router/layer{L}/...``), eval lines carry ``loss/val``. A line that does not parse (a crash
  mid-write) is skipped with a :class:`ReportWarning`.

A value missing from ``summary.json`` is taken from ``metrics.jsonl`` where it can be (last logged
train/val loss, tokens, steps, FLOPs/token = cumulative FLOPs / tokens, ...) and marked with a
dagger in the table; anything else is shown as ``-``.

Public API: :class:`ReportError`, :class:`ReportWarning`, :class:`RunRecord`, :func:`load_run`,
:func:`compare_runs`.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "ReportError",
    "ReportWarning",
    "RunRecord",
    "load_run",
    "compare_runs",
    "PLOT_FILES",
    "EXPERT_LOAD_FILE",
]

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
MARKDOWN_FILE = "compare.md"
EXPERT_LOAD_FILE = "expert_load.png"
# Always written, in this order (expert_load.png only when some run logged router loads).
PLOT_FILES = (
    "val_loss_vs_tokens.png",
    "val_loss_vs_flops.png",
    "train_loss_vs_tokens.png",
    "tokens_per_s.png",
)

_DPI = 110
_MISSING = "-"
_DERIVED_MARK = "\u2020"  # dagger: value taken from metrics.jsonl, not summary.json
_LOAD_KEY = re.compile(r"^router/layer(\d+)/load$")

# Table columns that come straight from a run's stats (the optional "val loss at T" column is added
# by compare_runs). Each is (header, stats key, formatter name).
_COLUMNS = (
    ("run", None, None),
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


class ReportError(ValueError):
    """A run folder (or the output folder) cannot be used; the message names the folder or file."""


class ReportWarning(UserWarning):
    """Something in a run folder was skipped or repaired (e.g. a truncated metrics line)."""


# ------------------------------------------------------------------------------------------ loading


@dataclass
class RunRecord:
    """Everything the report needs from one run folder.

    ``stats`` holds the table values (keys of ``summary.json``); a value is ``None`` when neither
    ``summary.json`` nor ``metrics.jsonl`` provides it. Keys in ``derived`` were filled in from
    ``metrics.jsonl``. ``train`` and ``evals`` are the metrics lines split by kind, in step order
    (if a resumed run re-logged steps, the later lines win). ``warnings`` lists what was skipped.
    """

    path: str
    name: str
    summary: Dict[str, Any]
    train: List[Dict[str, Any]]
    evals: List[Dict[str, Any]]
    stats: Dict[str, Any]
    derived: set = field(default_factory=set)
    warnings: List[str] = field(default_factory=list)

    @property
    def is_moe(self) -> bool:
        return self.stats.get("model_type") == "moe"

    @property
    def status(self) -> Optional[str]:
        return self.stats.get("status")

    def moe_layers(self) -> List[int]:
        """Block indices of the MoE layers that logged ``router/layer{L}/load``, sorted."""
        layers = set()
        for line in self.train:
            for key in line:
                m = _LOAD_KEY.match(key)
                if m:
                    layers.add(int(m.group(1)))
        return sorted(layers)

    def expert_load(self, layer: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(steps [n], load [n, E])`` for one MoE layer: fraction of routed token-slots per expert
        over each logging interval. Rows of unequal length are padded with NaN."""
        key = f"router/layer{layer}/load"
        steps, rows = [], []
        for line in self.train:
            load = line.get(key)
            if isinstance(load, (list, tuple)) and load:
                steps.append(line["step"])
                rows.append([_as_float(v) for v in load])
        n_exp = max((len(r) for r in rows), default=0)
        mat = np.full((len(rows), n_exp), np.nan)
        for i, r in enumerate(rows):
            mat[i, : len(r)] = r
        return np.asarray(steps, dtype=float), mat

    def series(self, kind: str, key: str, x: str = "tokens") -> Tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` arrays of ``key`` against ``x`` over the ``"train"`` or ``"eval"`` lines that
        have both as numbers."""
        lines = self.train if kind == "train" else self.evals
        xs, ys = [], []
        for line in lines:
            xv, yv = _num(line.get(x)), _num(line.get(key))
            if xv is not None and yv is not None:
                xs.append(xv)
                ys.append(yv)
        return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def _num(v: Any) -> Optional[float]:
    """A JSON number as float, else None (bools are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _as_float(v: Any) -> float:
    f = _num(v)
    return math.nan if f is None else f


def _warn(record_warnings: List[str], msg: str) -> None:
    record_warnings.append(msg)
    warnings.warn(msg, ReportWarning, stacklevel=3)


def _read_summary(path: str, notes: List[str]) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        _warn(notes, f"{path}: unreadable ({e}); ignoring it")
        return {}
    if not isinstance(data, dict):
        _warn(notes, f"{path}: expected a JSON object, got {type(data).__name__}; ignoring it")
        return {}
    return data


def _append_in_step_order(series: List[Dict[str, Any]], line: Dict[str, Any]) -> bool:
    """Append ``line``; if its step is not after the last one (a resumed run re-logging steps), drop
    the older lines at or after that step first. Returns True when something was dropped."""
    step = line["step"]
    dropped = False
    while series and series[-1]["step"] >= step:
        series.pop()
        dropped = True
    series.append(line)
    return dropped


def _read_metrics(path: str, notes: List[str]) -> Tuple[List[dict], List[dict]]:
    train: List[dict] = []
    evals: List[dict] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            raw_lines = f.read().splitlines()
    except OSError as e:
        _warn(notes, f"{path}: unreadable ({e}); ignoring it")
        return train, evals
    # Index of the last non-blank line, so a bad line there can be called a truncated write.
    last = max((i for i, s in enumerate(raw_lines) if s.strip()), default=-1)
    rewound = 0
    for i, text in enumerate(raw_lines):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            what = "truncated last line" if i == last else "malformed line"
            _warn(notes, f"{path}:{i + 1}: skipped {what} (not valid JSON)")
            continue
        if not isinstance(line, dict) or _num(line.get("step")) is None:
            _warn(notes, f"{path}:{i + 1}: skipped line without an integer 'step'")
            continue
        if "loss/val" in line and "loss/train" not in line:
            rewound += _append_in_step_order(evals, line)
        else:
            rewound += _append_in_step_order(train, line)
    if rewound:
        _warn(notes, f"{path}: steps went backwards {rewound} time(s) (resumed run?); "
                     "kept the later lines")
    return train, evals


def _fill_from_metrics(stats: Dict[str, Any], derived: set, train: List[dict],
                       evals: List[dict]) -> None:
    """Fill table values missing from summary.json from the metrics lines, recording which."""

    def put(key: str, value: Any) -> None:
        if stats.get(key) is None and value is not None:
            stats[key] = value
            derived.add(key)

    def last(lines: List[dict], key: str) -> Optional[float]:
        for line in reversed(lines):
            v = _num(line.get(key))
            if v is not None:
                return v
        return None

    all_lines = sorted(train + evals, key=lambda l: l["step"])
    if all_lines:
        final = all_lines[-1]
        put("steps", _num(final.get("step")))
        tokens = _num(final.get("tokens"))
        put("tokens", tokens)
        flops = _num(final.get("flops"))
        if flops is not None and tokens:
            put("flops_per_token", flops / tokens)
    put("train_loss", last(train, "loss/train"))
    put("val_loss", last(evals, "loss/val"))
    put("val_ppl", last(evals, "ppl/val"))
    put("tokens_per_s", last(train, "speed/tokens_per_s"))
    if train and stats.get("model_type") is None:
        is_moe = any(_LOAD_KEY.match(k) or k.startswith("router/") for line in train for k in line)
        put("model_type", "moe" if is_moe else "dense")


def load_run(run_dir: str) -> RunRecord:
    """Parse one run folder. Raises :class:`ReportError` (naming the folder) if it does not exist or
    holds neither ``summary.json`` nor ``metrics.jsonl``. Problems inside the files (a truncated
    metrics line, an unreadable summary) are skipped with a :class:`ReportWarning` and listed in
    ``RunRecord.warnings``."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise ReportError(f"{run_dir}: not a run folder (no such directory)")
    summary_path = os.path.join(run_dir, SUMMARY_FILE)
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    has_summary, has_metrics = os.path.isfile(summary_path), os.path.isfile(metrics_path)
    if not has_summary and not has_metrics:
        raise ReportError(
            f"{run_dir}: not a run folder (no {SUMMARY_FILE} and no {METRICS_FILE})")

    notes: List[str] = []
    summary = _read_summary(summary_path, notes) if has_summary else {}
    train, evals = _read_metrics(metrics_path, notes) if has_metrics else ([], [])

    stats: Dict[str, Any] = {}
    for _, key, _fmt in _COLUMNS:
        if key is not None:
            stats[key] = summary.get(key)
    stats["status"] = summary.get("status")
    derived: set = set()
    _fill_from_metrics(stats, derived, train, evals)
    if not has_summary:
        notes.append(f"{run_dir}: no {SUMMARY_FILE} (run still going or died?); "
                     f"values taken from {METRICS_FILE}")

    name = summary.get("name")
    if not isinstance(name, str) or not name.strip():
        name = os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    return RunRecord(path=run_dir, name=name, summary=summary, train=train, evals=evals,
                     stats=stats, derived=derived, warnings=notes)


# --------------------------------------------------------------------------------------- formatting


def _fmt_count(x: float) -> str:
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


def _fmt_sci(x: float) -> str:
    """4.5e13 -> '4.50e13' (no '+' or leading zeros in the exponent)."""
    if not math.isfinite(x):
        return str(x)
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.3g}"
    mant, exp = f"{x:.2e}".split("e")
    return f"{mant}e{int(exp)}"


def _fmt_duration(s: float) -> str:
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


def _format(value: Any, kind: str) -> str:
    if value is None:
        return _MISSING
    if kind == "text" or isinstance(value, str):
        return _md_escape(str(value))
    x = _num(value)
    if x is None:
        return _md_escape(str(value))
    if kind == "count":
        return _fmt_count(x)
    if kind == "sci":
        return _fmt_sci(x)
    if kind == "int":
        return f"{int(x):,}" if math.isfinite(x) and x.is_integer() else f"{x:g}"
    if kind == "loss":
        return f"{x:.4f}" if math.isfinite(x) else str(x)
    if kind == "ppl":
        return f"{x:.2f}" if math.isfinite(x) and x < 1e5 else _fmt_sci(x)
    if kind == "duration":
        return _fmt_duration(x)
    return str(value)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------------------------ val loss at T


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


# ------------------------------------------------------------------------------------------- plots


def _new_figure(figsize=(7.5, 4.6)):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=_DPI, layout="constrained")


def _save(fig, path: str) -> None:
    fig.savefig(path, dpi=_DPI, format="png")


def _colors(n: int) -> List[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged by any run", transform=ax.transAxes,
            ha="center", va="center", color="0.4")


def _human_axis(axis) -> None:
    """Tick labels like 200K / 1.50B instead of 200000 or an offset."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(
        FuncFormatter(lambda v, _p: re.sub(r"\.0+(?=[KMBTQ]?$)", "", _fmt_count(v))))


def _legend(ax) -> None:
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize="small", framealpha=0.85)


def _ema(y: np.ndarray, beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average; NaN/inf inputs are carried over (not averaged)."""
    out = np.empty_like(y)
    acc, weight = 0.0, 0.0
    for i, v in enumerate(y):
        if math.isfinite(v):
            acc = beta * acc + (1 - beta) * v
            weight = beta * weight + (1 - beta)
        out[i] = acc / weight if weight else math.nan
    return out


def _plot_val(runs, names, colors, path, x_key: str, t_common: Optional[float]) -> None:
    fig = _new_figure()
    ax = fig.add_subplot()
    plotted = False
    for run, name, color in zip(runs, names, colors):
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
        _human_axis(ax.xaxis)
        ax.set_title("Validation loss vs training tokens")
        if t_common is not None and plotted:
            ax.axvline(t_common, color="0.5", linestyle=":", linewidth=1,
                       label=f"common budget ({_fmt_count(t_common)} tokens)")
    else:
        ax.set_xlabel("training FLOPs (cumulative, log scale)")
        ax.set_title("Validation loss vs training compute")
        if plotted:
            ax.set_xscale("log")
    ax.set_ylabel("validation loss")
    ax.grid(True, alpha=0.3)
    if not plotted:
        _no_data(ax, "eval (loss/val) lines")
    _legend(ax)
    _save(fig, path)


def _plot_train(runs, names, colors, path) -> None:
    fig = _new_figure()
    ax = fig.add_subplot()
    plotted = smoothed = False
    for run, name, color in zip(runs, names, colors):
        x, y = run.series("train", "loss/train", "tokens")
        if not len(x):
            continue
        if len(x) >= 20:
            ax.plot(x, y, color=color, linewidth=0.8, alpha=0.25)
            ax.plot(x, _ema(y, 0.9), color=color, linewidth=1.6, label=name)
            smoothed = True
        else:
            ax.plot(x, y, color=color, linewidth=1.5, marker=".", label=name)
        plotted = True
    ax.set_xlabel("tokens")
    _human_axis(ax.xaxis)
    ax.set_ylabel("training loss")
    ax.set_title("Training loss vs tokens" + (" (EMA 0.9; raw values faint)" if smoothed else ""))
    ax.grid(True, alpha=0.3)
    if not plotted:
        _no_data(ax, "train (loss/train) lines")
    _legend(ax)
    _save(fig, path)


def _plot_speed(runs, names, colors, path) -> None:
    fig = _new_figure()
    ax = fig.add_subplot()
    plotted = False
    for run, name, color in zip(runs, names, colors):
        x, y = run.series("train", "speed/tokens_per_s", "tokens")
        if len(x):
            ax.plot(x, y, color=color, linewidth=1.5, label=name)
            plotted = True
        elif _num(run.stats.get("tokens_per_s")) is not None:
            # No per-step speed logged: show the run's average as a flat line.
            ax.axhline(float(run.stats["tokens_per_s"]), color=color, linestyle="--",
                       linewidth=1.2, label=f"{name} (summary average)")
            plotted = True
    ax.set_xlabel("tokens")
    _human_axis(ax.xaxis)
    ax.set_ylabel("throughput (tokens/s)")
    ax.set_title("Training throughput")
    ax.grid(True, alpha=0.3)
    if plotted:
        ax.set_ylim(bottom=0)
        _human_axis(ax.yaxis)
    else:
        _no_data(ax, "throughput (speed/tokens_per_s)")
    _legend(ax)
    _save(fig, path)


def _cell_edges(steps: np.ndarray) -> np.ndarray:
    """Cell i spans (steps[i-1], steps[i]]: each load row covers the steps since the previous log."""
    first = steps[0] - (steps[1] - steps[0] if len(steps) > 1 else 1.0)
    if steps[0] > 0:
        first = max(first, 0.0)  # the first interval starts at step 0 at the earliest
    return np.concatenate([[first], steps])


def _plot_expert_load(moe_runs: List[Tuple[str, RunRecord, List[int]]], path: str) -> None:
    """One row block per MoE run, one panel per MoE layer (wrapped at 4 per row)."""
    ncols = min(4, max(len(layers) for _, _, layers in moe_runs))
    row_blocks = [math.ceil(len(layers) / ncols) for _, _, layers in moe_runs]
    nrows = sum(row_blocks)
    fig = _new_figure(figsize=(2.2 + 3.3 * ncols, 0.6 + 2.5 * nrows))
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
    _save(fig, path)


# ------------------------------------------------------------------------------------------ compare


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


def _best(values: Sequence[Optional[float]]) -> Optional[float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return min(finite) if finite else None


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
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        # Figures below are built without pyplot and render with Agg regardless; this only makes
        # sure a later pyplot import in a headless CLI process does not try to open a display.
        matplotlib.use("Agg")

    run_dirs = [os.fspath(d) for d in run_dirs]
    if not run_dirs:
        raise ReportError("no run folders given")
    runs = [load_run(d) for d in run_dirs]
    out_dir = os.fspath(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ReportError(f"{out_dir}: cannot create output folder ({e})") from e

    names = _unique_names(runs)
    colors = _colors(len(runs))
    notes: List[str] = []

    # ---- token budgets: equal, or compare at the largest token count every run evaluated at.
    token_counts = [_num(r.stats.get("tokens")) for r in runs]
    same_tokens = all(t is not None for t in token_counts) and len(set(token_counts)) == 1
    t_common: Optional[float] = None
    at_t: List[Optional[float]] = [None] * len(runs)
    if same_tokens:
        if len(runs) > 1:
            notes.append(f"All runs trained on the same number of tokens "
                         f"({int(token_counts[0]):,}).")
    else:
        counts = "; ".join(f"{_md_escape(n)}: {int(t):,}" if t is not None else
                           f"{_md_escape(n)}: unknown" for n, t in zip(names, token_counts))
        notes.append(f"**val loss compared at different token counts** ({counts}).")
        curves = [_eval_curve(r) for r in runs]
        with_evals = [i for i, (x, _) in enumerate(curves) if len(x)]
        if with_evals:
            t_common = min(float(curves[i][0][-1]) for i in with_evals)
            at_t = [_val_loss_at(x, y, t_common) for x, y in curves]
            lacking = [names[i] for i in range(len(runs)) if i not in with_evals]
            note = (f"The \"val loss at {_fmt_count(t_common)} tokens\" column compares every run "
                    f"at {int(t_common):,} tokens, the largest token count all runs reached at an "
                    f"eval point; values are interpolated linearly between eval points.")
            if lacking:
                note += (" Runs without a finite eval point in metrics.jsonl are left out: "
                         + ", ".join(_md_escape(n) for n in lacking) + ".")
            notes.append(note)
        else:
            notes.append("No run has an eval point with a finite loss/val in metrics.jsonl, so "
                         "val loss cannot be compared at a common token count.")

    # ---- table
    headers = [h for h, _, _ in _COLUMNS]
    if t_common is not None:
        headers.append(f"val loss at {_fmt_count(t_common)} tokens")
    best_final = _best([_num(r.stats.get("val_loss")) for r in runs])
    best_at_t = _best(at_t)
    any_derived = False
    rows = []
    for i, (run, name) in enumerate(zip(runs, names)):
        status = run.status
        label = _md_escape(name)
        if isinstance(status, str) and status != "finished":
            label += f" ({_md_escape(status)})"
        cells = [label]
        for _, key, kind in _COLUMNS[1:]:
            text = _format(run.stats.get(key), kind)
            if key == "val_loss" and best_final is not None and \
                    _num(run.stats.get(key)) == best_final and len(runs) > 1:
                text = f"**{text}**"
            if key in run.derived and text != _MISSING:
                text += _DERIVED_MARK
                any_derived = True
            cells.append(text)
        if t_common is not None:
            text = _format(at_t[i], "loss")
            if at_t[i] is not None and at_t[i] == best_at_t and len(runs) > 1:
                text = f"**{text}**"
            cells.append(text)
        rows.append(cells)
    table = "\n".join(
        ["| " + " | ".join(headers) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(headers) - 2)) + "|"]
        + ["| " + " | ".join(r) + " |" for r in rows])

    if len(runs) > 1 and (best_final is not None or best_at_t is not None):
        notes.insert(0, "**Bold**: lowest val loss in the column.")
    if any_derived:
        notes.append(f"{_DERIVED_MARK} not in summary.json; taken from metrics.jsonl (last logged "
                     "value; FLOPs/token = cumulative FLOPs / tokens).")
    notes.append(f"\"{_MISSING}\": not recorded by the run.")

    # ---- plots
    for fname in PLOT_FILES:
        path = os.path.join(out_dir, fname)
        if fname == "val_loss_vs_tokens.png":
            _plot_val(runs, names, colors, path, "tokens", t_common)
        elif fname == "val_loss_vs_flops.png":
            _plot_val(runs, names, colors, path, "flops", None)
        elif fname == "train_loss_vs_tokens.png":
            _plot_train(runs, names, colors, path)
        else:
            _plot_speed(runs, names, colors, path)

    moe_runs = [(n, r, r.moe_layers()) for n, r in zip(names, runs)]
    moe_runs = [m for m in moe_runs if m[2]]
    no_load = [n for n, r in zip(names, runs) if r.is_moe and not r.moe_layers()]
    expert_path = os.path.join(out_dir, EXPERT_LOAD_FILE)
    if moe_runs:
        _plot_expert_load(moe_runs, expert_path)
    elif os.path.exists(expert_path):
        os.remove(expert_path)  # stale, from an earlier comparison in the same folder

    # ---- markdown
    plot_titles = {
        "val_loss_vs_tokens.png": "Validation loss vs tokens",
        "val_loss_vs_flops.png": "Validation loss vs training FLOPs",
        "train_loss_vs_tokens.png": "Training loss vs tokens",
        "tokens_per_s.png": "Throughput (tokens/s)",
        EXPERT_LOAD_FILE: "Expert load per MoE layer",
    }
    md = ["# Run comparison", "", "Runs, in the order given:", ""]
    md += [f"- **{_md_escape(n)}**: `{r.path}`" for n, r in zip(names, runs)]
    md += ["", table, ""]
    md += [f"- {n}" for n in notes]
    md += ["", "## Plots", ""]
    for fname in PLOT_FILES:
        md += [f"### [{plot_titles[fname]}]({fname})", "", f"![{plot_titles[fname]}]({fname})", ""]
    md += [f"### {plot_titles[EXPERT_LOAD_FILE]}", ""]
    if moe_runs:
        md += [f"[{EXPERT_LOAD_FILE}]({EXPERT_LOAD_FILE})", "",
               f"![{plot_titles[EXPERT_LOAD_FILE]}]({EXPERT_LOAD_FILE})", ""]
        if no_load:
            md += ["MoE runs without router load lines in metrics.jsonl (not shown): "
                   + ", ".join(_md_escape(n) for n in no_load) + ".", ""]
    elif no_load:
        md += [f"{EXPERT_LOAD_FILE} not written: the MoE runs ("
               + ", ".join(_md_escape(n) for n in no_load)
               + ") logged no router load lines in metrics.jsonl.", ""]
    else:
        md += [f"{EXPERT_LOAD_FILE} not written: no run is MoE.", ""]
    run_warnings = [(n, w) for n, r in zip(names, runs) for w in r.warnings]
    if run_warnings:
        md += ["## Warnings", ""] + [f"- {_md_escape(n)}: {_md_escape(w)}" for n, w in run_warnings]
        md += [""]
    with open(os.path.join(out_dir, MARKDOWN_FILE), "w", encoding="utf-8") as f:
        f.write("\n".join(md))

    return table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
