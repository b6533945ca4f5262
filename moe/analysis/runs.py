"""Reading a run folder into a :class:`RunRecord`: what `moe compare` and `moe report` know of a run.

A run folder holds what the trainer leaves there:

* ``summary.json`` -- final numbers of the run (any key may be missing for a run that died);
* ``metrics.jsonl`` -- one JSON object per log line; train lines carry ``loss/train`` (and, for MoE
  runs, ``router/layer{L}/...``), eval lines carry ``loss/val``. A line that does not parse (a crash
  mid-write) is skipped with a :class:`ReportWarning`.

A value missing from ``summary.json`` is taken from ``metrics.jsonl`` where it can be (last logged
train/val loss, tokens, steps, FLOPs/token = cumulative FLOPs / tokens, ...) and its key is listed
in ``RunRecord.derived``.

The names of the files read here (run folders and `moe sweep`'s sweep folders) are defined once,
below; the rest of the package uses these constants.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from moe.errors import MoeError
from moe.io import METRICS_FILE, SUMMARY_FILE

__all__ = [
    "SUMMARY_FILE",
    "METRICS_FILE",
    "SWEEP_FILE",
    "STAT_KEYS",
    "ReportError",
    "ReportWarning",
    "RunRecord",
    "as_number",
    "load_run",
]

SWEEP_FILE = "sweep.json"  # the manifest `moe sweep` writes into a sweep folder

# The keys of summary.json a RunRecord carries in ``stats`` (besides "status"), in table order.
STAT_KEYS = (
    "model_type",
    "params_total",
    "params_active",
    "flops_per_token",
    "tokens",
    "steps",
    "train_loss",
    "val_loss",
    "val_ppl",
    "tokens_per_s",
    "wall_s",
)

_LOAD_KEY = re.compile(r"^router/layer(\d+)/load$")


class ReportError(MoeError, ValueError):
    """A run folder (or the output folder) cannot be used; the message names the folder or file."""


class ReportWarning(UserWarning):
    """Something in a run folder was skipped or repaired (e.g. a truncated metrics line)."""


def as_number(v: Any) -> Optional[float]:
    """A JSON number as float, else None (bools are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _as_float(v: Any) -> float:
    f = as_number(v)
    return math.nan if f is None else f


@dataclass
class RunRecord:
    """Everything the reports need from one run folder.

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
            xv, yv = as_number(line.get(x)), as_number(line.get(key))
            if xv is not None and yv is not None:
                xs.append(xv)
                ys.append(yv)
        return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)

    def last_router_mean(self, key_suffix: str) -> Optional[float]:
        """Mean over MoE layers of the last logged router statistic ending in ``key_suffix`` (e.g.
        ``"/max_over_mean"``), or None if no train line has one as a number."""
        for line in reversed(self.train):
            vals = [v for k, v in line.items() if k.startswith("router/") and k.endswith(key_suffix)
                    and isinstance(v, (int, float))]
            if vals:
                return float(np.mean(vals))
        return None

    def router_mean_series(self, key_suffix: str) -> Tuple[List[Any], List[float]]:
        """``(tokens, mean over MoE layers)`` of the router statistic ending in ``key_suffix``, one
        point per train line that has both."""
        xs, ys = [], []
        for line in self.train:
            vals = [v for k, v in line.items() if k.startswith("router/") and k.endswith(key_suffix)]
            if vals and line.get("tokens") is not None:
                xs.append(line["tokens"])
                ys.append(float(np.mean(vals)))
        return xs, ys


# ------------------------------------------------------------------------------------------ reading


def _warn(record_warnings: List[str], msg: str) -> None:
    record_warnings.append(msg)
    # stacklevel 3: the warning names the line of load_run that read the file
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
        if not isinstance(line, dict) or as_number(line.get("step")) is None:
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
            v = as_number(line.get(key))
            if v is not None:
                return v
        return None

    all_lines = sorted(train + evals, key=lambda l: l["step"])
    if all_lines:
        final = all_lines[-1]
        put("steps", as_number(final.get("step")))
        tokens = as_number(final.get("tokens"))
        put("tokens", tokens)
        flops = as_number(final.get("flops"))
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

    stats: Dict[str, Any] = {key: summary.get(key) for key in STAT_KEYS}
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
