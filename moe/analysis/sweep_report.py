"""`moe report DIR...`: group sweep runs by their swept values, average over seeds, plot and tabulate.

Accepts sweep folders (holding sweep.json, written by `moe sweep`) and plain run folders (each its
own group). Writes report.md, report.json and PNG plots. Failed or unfinished runs appear in the
report as such, never silently dropped.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from moe.analysis import compare as rp


@dataclass
class Member:
    name: str
    path: str
    values: Dict[str, Any]
    status: str
    record: Optional[rp.RunRecord] = None


@dataclass
class Group:
    label: str
    values: Dict[str, Any]
    members: List[Member] = field(default_factory=list)

    @property
    def finished(self) -> List[Member]:
        return [m for m in self.members if m.status == "finished" and m.record is not None]


def _label(values: Dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in values.items()) or "base"


def collect(dirs: List[str]) -> Tuple[List[Group], List[str]]:
    """Groups of runs (by swept values without the seed) and the swept keys."""
    groups: Dict[str, Group] = {}
    swept: List[str] = []
    for d in dirs:
        manifest = os.path.join(d, "sweep.json")
        if os.path.isfile(manifest):
            with open(manifest) as f:
                spec = json.load(f)
            for k in spec.get("swept_keys", []):
                if k != "run.seed" and k not in swept:
                    swept.append(k)
            for entry in spec["runs"]:
                path = os.path.join(d, entry["name"])
                values = {k: v for k, v in entry["values"].items() if k != "run.seed"}
                status = entry.get("status") or "not run"
                record = None
                if os.path.isdir(path):
                    try:
                        record = rp.load_run(path)
                        if status == "not run" or record.status == "finished":
                            status = record.status or status
                    except rp.ReportError:
                        record = None
                label = _label(values)
                group = groups.setdefault(label, Group(label, values))
                group.members.append(Member(entry["name"], path, entry["values"], status, record))
        else:
            record = rp.load_run(d)  # raises ReportError naming a folder that is not a run
            label = record.name
            group = groups.setdefault(label, Group(label, {}))
            group.members.append(Member(record.name, d, {}, record.status or "unknown", record))
    if not groups:
        raise rp.ReportError("no runs found in " + ", ".join(dirs))
    return list(groups.values()), swept


def _last(record: rp.RunRecord, key_suffix: str) -> Optional[float]:
    """Mean over MoE layers of the last logged router statistic ending in key_suffix."""
    for line in reversed(record.train):
        vals = [v for k, v in line.items() if k.startswith("router/") and k.endswith(key_suffix)
                and isinstance(v, (int, float))]
        if vals:
            return float(np.mean(vals))
    return None


def _mean_std(values: List[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None, None, 0
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0), len(xs)


def summarise(group: Group) -> Dict[str, Any]:
    recs = [m.record for m in group.finished]
    row: Dict[str, Any] = {"variant": group.label, **group.values, "runs": len(group.members),
                           "finished": len(recs)}
    for key in ("val_loss", "train_loss", "tokens_per_s"):
        mean, std, n = _mean_std([r.stats.get(key) for r in recs])
        row[key], row[key + "_std"] = mean, std
    for key in ("params_total", "params_active", "flops_per_token", "tokens"):
        vals = [r.stats.get(key) for r in recs if r.stats.get(key) is not None]
        row[key] = vals[0] if vals else None
    row["load_max_over_mean"] = _mean_std([_last(r, "/max_over_mean") for r in recs])[0]
    row["dropped_frac"] = _mean_std([_last(r, "/dropped_frac") for r in recs])[0]
    row["failed"] = [(m.name, m.status) for m in group.members if m.status != "finished"]
    return row


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _mean_curve(recs: List[rp.RunRecord], kind: str, key: str, x: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    curves = [r.series(kind, key, x) for r in recs]
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return np.array([]), np.array([]), np.array([])
    n = min(len(c[0]) for c in curves)  # seeds share eval points; cut to the shortest
    xs = curves[0][0][:n]
    ys = np.stack([c[1][:n] for c in curves])
    return xs, ys.mean(0), ys.std(0)


def _plot_curves(groups, colors, path, kind, key, x, ylabel, title, logx=False):
    fig = rp._new_figure()
    ax = fig.add_subplot()
    for g, color in zip(groups, colors):
        xs, mean, std = _mean_curve([m.record for m in g.finished], kind, key, x)
        if not len(xs):
            continue
        ax.plot(xs, mean, marker="o" if kind == "eval" else None, ms=3, color=color, label=g.label)
        if len(g.finished) > 1:
            ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.15)
    ax.set_xlabel("training FLOPs" if x == "flops" else "tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logx:
        ax.set_xscale("log")
    else:
        rp._human_axis(ax.xaxis)
    ax.grid(alpha=0.3)
    rp._legend(ax)
    rp._save(fig, path)


def _plot_by_value(rows, key, path):
    fig = rp._new_figure((6.5, 4.2))
    ax = fig.add_subplot()
    others = [k for k in rows[0] if k not in (key,)]
    labels = [str(r.get(key)) for r in rows]
    order = sorted(set(labels), key=labels.index)
    xs = [order.index(l) for l in labels]
    ys = [r["val_loss"] if r["val_loss"] is not None else math.nan for r in rows]
    errs = [r["val_loss_std"] or 0.0 for r in rows]
    ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=3)
    for x, y, r in zip(xs, ys, rows):
        ax.annotate(r["variant"], (x, y), fontsize=6, alpha=0.7, xytext=(4, 2), textcoords="offset points")
    ax.set_xticks(range(len(order)), order)
    ax.set_xlabel(key)
    ax.set_ylabel("final val loss (mean ± std over seeds)")
    ax.set_title(f"final val loss by {key.split('.')[-1]}")
    ax.grid(alpha=0.3)
    rp._save(fig, path)
    del others


def build_report(dirs: List[str], out_dir: str, wandb_summary: bool = False) -> str:
    groups, swept = collect(dirs)
    os.makedirs(out_dir, exist_ok=True)
    rows = [summarise(g) for g in groups]
    colors = rp._colors(len(groups))
    plots = {
        "val_loss_vs_tokens.png": ("eval", "loss/val", "tokens", "val loss", "validation loss vs tokens", False),
        "val_loss_vs_flops.png": ("eval", "loss/val", "flops", "val loss", "validation loss vs training FLOPs", True),
        "tokens_per_s.png": ("train", "speed/tokens_per_s", "tokens", "tokens/s", "throughput", False),
    }
    for fname, (kind, key, x, ylabel, title, logx) in plots.items():
        _plot_curves(groups, colors, os.path.join(out_dir, fname), kind, key, x, ylabel, title, logx)
    _plot_balance(groups, colors, os.path.join(out_dir, "load_balance.png"))
    for key in swept:
        if any(key in r for r in rows):
            _plot_by_value(rows, key, os.path.join(out_dir, f"final_val_loss_by_{key.split('.')[-1]}.png"))
    moe_runs = [(g.label, g.finished[0].record, g.finished[0].record.moe_layers())
                for g in groups if g.finished and g.finished[0].record.moe_layers()]
    if moe_runs:
        rp._plot_expert_load(moe_runs, os.path.join(out_dir, "expert_load.png"))

    best = min((r["val_loss"] for r in rows if r["val_loss"] is not None), default=None)
    lines = ["# Sweep report", "", "Sources: " + ", ".join(f"`{d}`" for d in dirs), ""]
    head = ["variant", "seeds", "val loss (mean ± std)", "train loss", "params active", "params total",
            "tokens", "tokens/s", "load max/mean", "dropped"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        val = f"{_fmt(r['val_loss'])} ± {_fmt(r['val_loss_std'])}" if r["val_loss"] is not None else "-"
        if best is not None and r["val_loss"] == best:
            val = f"**{val}**"
        lines.append("| " + " | ".join([
            r["variant"].replace("|", "\\|"), f"{r['finished']}/{r['runs']}", val, _fmt(r["train_loss"]),
            rp._format(r["params_active"], "count"), rp._format(r["params_total"], "count"),
            rp._format(r["tokens"], "count"), rp._format(r["tokens_per_s"], "count"),
            _fmt(r["load_max_over_mean"], 2), _fmt(r["dropped_frac"], 3)]) + " |")
    failed = [(r["variant"], n, status) for r in rows for n, status in r["failed"]]
    lines += [""]
    if failed:
        lines += ["## Failed or unfinished runs", ""]
        for variant, name, status in failed:
            lines.append(f"- `{name}` ({variant}): {status}; its log is in the sweep folder (`{name}.log`, or "
                         f"`logs/slurm-<job>_<task>.out` for a Slurm array, job and task in sweep.json)")
        lines += [""]
    lines += ["Seeds are averaged per variant; ± is the sample standard deviation over seeds "
              "(0 with one seed). Load max/mean and dropped fraction are the last logged values, "
              "averaged over MoE layers and seeds.", "", "## Plots", ""]
    for fname in sorted(f for f in os.listdir(out_dir) if f.endswith(".png")):
        lines += [f"### {fname[:-4].replace('_', ' ')}", "", f"![{fname}]({fname})", ""]
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(rows, f, indent=2, default=str)
    if wandb_summary:
        sweep_names = [json.load(open(os.path.join(d, "sweep.json")))["name"] for d in dirs
                       if os.path.isfile(os.path.join(d, "sweep.json"))]
        _log_to_wandb(rows, out_dir, sweep_names[0] if sweep_names else os.path.basename(os.path.normpath(out_dir)))
    return text


def _plot_balance(groups, colors, path):
    fig = rp._new_figure()
    ax = fig.add_subplot()
    for g, color in zip(groups, colors):
        for i, m in enumerate(g.finished):
            xs, ys = [], []
            for line in m.record.train:
                vals = [v for k, v in line.items() if k.startswith("router/") and k.endswith("/max_over_mean")]
                if vals and line.get("tokens") is not None:
                    xs.append(line["tokens"])
                    ys.append(float(np.mean(vals)))
            if xs:
                ax.plot(xs, ys, color=color, alpha=0.9 if i == 0 else 0.4, label=g.label if i == 0 else None)
    ax.axhline(1.0, color="0.5", ls=":", lw=1)
    ax.set_xlabel("tokens")
    ax.set_ylabel("expert load max/mean (mean over MoE layers)")
    ax.set_title("load balance over training (1 = perfectly balanced)")
    rp._human_axis(ax.xaxis)
    ax.grid(alpha=0.3)
    rp._legend(ax)
    rp._save(fig, path)


def _log_to_wandb(rows: List[Dict[str, Any]], out_dir: str, group: str) -> None:
    """Log the table and plots to a summary run in the sweep's W&B group (offline unless WANDB_MODE)."""
    import wandb

    run = wandb.init(project="moe", group=group, job_type="report", name=f"{group}-report", dir=out_dir,
                     mode=os.environ.get("WANDB_MODE", "offline"))
    cols = ["variant", "finished", "val_loss", "val_loss_std", "tokens_per_s", "load_max_over_mean"]
    run.log({"report/table": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})
    for fname in sorted(os.listdir(out_dir)):
        if fname.endswith(".png"):
            run.log({f"report/{fname[:-4]}": wandb.Image(os.path.join(out_dir, fname))})
    run.finish()
