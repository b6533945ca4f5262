"""`moe sweep SWEEP.yaml`: run a grid or list of config variants (router ablations, seeds, ...).

A sweep file:

    name: router_ablation          # sweep name: W&B group, and the folder runs/<name>/
    base: ../debug_moe.yaml        # config every run starts from (relative to the sweep file)
    overrides: [train.steps=50]    # applied to every run
    grid:                          # cartesian product over dotted keys
      model.moe.top_k: [1, 2]
      model.moe.aux_loss_coef: [0.0, 0.01]
    variants:                      # optional: explicit override sets, crossed with the grid
      - {model.moe.router: topk}
      - {model.moe.router: expert_choice, model.moe.capacity_factor: 1.0}
    seeds: [0, 1]                  # run.seed values (default: the base config's seed)

Every run's config is loaded and validated before the first run starts, so a key that does not
exist or a bad value fails at once, naming the key and the run. Run names are deterministic
(`top_k=1,aux_loss_coef=0.0,seed=0`), so a rerun skips finished runs and resumes unfinished ones
(each run resumes from its own latest checkpoint). A failed run is recorded in sweep.json with its
log and never stops the others.

`moe sweep SWEEP.yaml --slurm [launch options]` submits the runs that are not finished as one Slurm
job array through `moe launch` (task i trains run i of the sweep, so the ids are stable across
reruns); the array's script and job logs live in the sweep folder, and sweep.json records each run's
job and task id. A rerun skips finished runs and runs still queued or running in an earlier array.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from moe.config import ConfigError, folder_name_error, load_config
from moe.io import RunFolder, atomic_write
from moe.launch import active_array_tasks, check_options, check_plans, check_tasks, submit, wait_for_job
from moe.metrics import training_env
from moe.validate import validate


@dataclass
class SweepRun:
    name: str
    overrides: Dict[str, Any]
    """The swept values of this run (grid + variant + seed), dotted key -> value."""
    args: List[str] = field(default_factory=list)
    """Full override list passed to `moe train`."""


@dataclass
class Sweep:
    name: str
    path: str
    base: str
    common: List[str]
    runs: List[SweepRun]
    swept_keys: List[str]
    root: str


def _fmt_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _short_names(keys: List[str]) -> Dict[str, str]:
    """Last dotted component, unless two keys share it."""
    tails = [k.split(".")[-1] for k in keys]
    return {k: (t if tails.count(t) == 1 else k) for k, t in zip(keys, tails)}


def _run_name(values: Dict[str, Any], short: Dict[str, str]) -> str:
    parts = [f"{short[k]}={_fmt_value(v)}" for k, v in values.items()]
    name = ",".join(parts) or "base"
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def load_sweep(path: str, runs_root: str = "runs", world_size: int = 1) -> Sweep:
    if not os.path.isfile(path):
        raise ConfigError(f"sweep file not found: {path}")
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    allowed = {"name", "base", "overrides", "grid", "variants", "seeds"}
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    if "base" not in spec:
        raise ConfigError(f"{path}: `base` (the config every run starts from) is required")
    name = str(spec.get("name") or os.path.splitext(os.path.basename(path))[0])
    error = folder_name_error("the sweep name", name)
    if error:  # the sweep's runs go to <root>/<name>/: `name: ../x` would write outside it
        raise ConfigError(f"{path}: {error}")
    base = os.path.join(os.path.dirname(path), spec["base"])
    common = [str(o) for o in spec.get("overrides") or []]
    grid = spec.get("grid") or {}
    variants = spec.get("variants") or [{}]
    seeds = spec.get("seeds")
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: `grid` must map dotted keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid key {key!r} needs a non-empty list of values, got {values!r}")
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise ConfigError(f"{path}: `variants` must be a list of mappings of dotted keys to values")
    if not grid and variants == [{}] and not seeds:
        raise ConfigError(f"{path}: empty sweep: give a `grid`, `variants` or `seeds`")
    if seeds is not None and (not isinstance(seeds, list) or not seeds):
        raise ConfigError(f"{path}: `seeds` must be a non-empty list")

    keys = list(grid)
    variant_keys = sorted({k for v in variants for k in v})
    swept = variant_keys + [k for k in keys if k not in variant_keys] + (["run.seed"] if seeds else [])
    short = _short_names(swept)
    short["run.seed"] = "seed"
    root = os.path.join(runs_root, name)
    runs: List[SweepRun] = []
    for variant in variants:
        for combo in itertools.product(*(grid[k] for k in keys)):
            for seed in (seeds or [None]):
                values: Dict[str, Any] = dict(variant)
                values.update(zip(keys, combo))
                if seed is not None:
                    values["run.seed"] = seed
                ordered = {k: values[k] for k in swept if k in values}
                run = SweepRun(name=_run_name(ordered, short), overrides=ordered)
                tags = [f"{short[k]}:{_fmt_value(v)}" for k, v in ordered.items()]
                run.args = common + [f"{k}={_fmt_value(v)}" for k, v in ordered.items()] + [
                    f"run.name={run.name}", f"run.root={root}", f"logging.wandb.group={name}",
                    "logging.wandb.tags=[" + ",".join(t.replace(",", ";") for t in tags) + "]",
                    "logging.wandb.job_type=train"]
                runs.append(run)
    for run in runs:  # the derived names are folders too (many swept keys make one too long)
        error = folder_name_error("a run name", run.name)
        if error:
            raise ConfigError(f"{path}: {error}")
    names = [r.name for r in runs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"{path}: several runs would share the names {sorted(dupes)}; make the variants differ")
    for run in runs:  # every run is checked before any starts
        try:
            validate(load_config(base, run.args), world_size)
        except ConfigError as exc:
            raise ConfigError(f"{path}: run {run.name}: {exc}") from None
    return Sweep(name=name, path=path, base=base, common=common, runs=runs, swept_keys=swept, root=root)


def run_status(run_dir: str) -> str:
    """finished | unfinished | missing (judged from summary.json)."""
    path = RunFolder(run_dir).summary
    if not os.path.isfile(path):
        return "missing"
    try:
        with open(path) as f:
            summary = json.load(f)
    except ValueError:
        return "unfinished"
    return "finished" if summary.get("status") == "finished" else "unfinished"


def write_manifest(sweep: Sweep, results: Dict[str, Dict[str, Any]]) -> str:
    os.makedirs(sweep.root, exist_ok=True)
    manifest = {
        "name": sweep.name, "sweep_file": os.path.abspath(sweep.path), "base": os.path.abspath(sweep.base),
        "overrides": sweep.common, "swept_keys": sweep.swept_keys,
        "runs": [{"name": r.name, "values": r.overrides, "args": r.args, **results.get(r.name, {})}
                 for r in sweep.runs],
    }
    path = os.path.join(sweep.root, "sweep.json")
    atomic_write(path, json.dumps(manifest, indent=2))
    return path


def read_manifest(sweep: Sweep) -> Dict[str, Dict[str, Any]]:
    """{run name: its entry} from an earlier sweep.json of this sweep (empty if none)."""
    path = os.path.join(sweep.root, "sweep.json")
    try:
        with open(path) as f:
            return {r["name"]: r for r in json.load(f).get("runs", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _still_in_slurm(entries: Dict[str, Dict[str, Any]]) -> Dict[str, str]:
    """{run name: 'STATE in job J'} for runs an earlier `--slurm` submission still has queued or running."""

    jobs = {e["job_id"] for e in entries.values() if e.get("job_id") and e.get("status") == "submitted"}
    active = {job: active_array_tasks(job) for job in jobs}
    out = {}
    for name, e in entries.items():
        state = active.get(e.get("job_id"), {}).get(e.get("task_id"))
        if e.get("status") == "submitted" and state:
            out[name] = f"{state.lower()} in Slurm job {e['job_id']}_{e['task_id']}"
    return out


def pending_runs(sweep: Sweep, log=print) -> tuple:
    """(runs to start, results so far): finished runs and runs an earlier Slurm array still has
    queued or running are left out (and kept in the results), everything else is to run."""
    results: Dict[str, Dict[str, Any]] = {}
    pending: List[SweepRun] = []
    previous = read_manifest(sweep)
    in_slurm = _still_in_slurm(previous)
    for run in sweep.runs:
        status = run_status(os.path.join(sweep.root, run.name))
        if status == "finished":
            results[run.name] = {"status": "finished", "skipped": True}
            log(f"[sweep] {run.name}: finished earlier, skipped")
        elif run.name in in_slurm:
            results[run.name] = {k: v for k, v in previous[run.name].items() if k not in ("name", "values", "args")}
            log(f"[sweep] {run.name}: {in_slurm[run.name]}, skipped")
        else:
            pending.append(run)
    return pending, results


def run_local(sweep: Sweep, parallel: int = 1, threads: int = 0, extra_env: Optional[Dict[str, str]] = None,
              log=print) -> Dict[str, Dict[str, Any]]:
    """Run the sweep's runs on this machine, `parallel` at a time; returns per-run results."""
    pending, results = pending_runs(sweep, log)
    write_manifest(sweep, results)
    os.makedirs(sweep.root, exist_ok=True)
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, parallel))

    env = training_env(extra_env)
    active: List[tuple] = []
    while pending or active:
        while pending and len(active) < parallel:
            run = pending.pop(0)
            log_path = os.path.join(sweep.root, f"{run.name}.log")
            cmd = [sys.executable, "-m", "moe.cli", "train", sweep.base, *run.args, f"train.threads={threads}",
                   "logging.progress=false"]
            log(f"[sweep] start {run.name} (log: {log_path})")
            handle = open(log_path, "a")
            proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
            active.append((run, proc, handle, time.time()))
        time.sleep(0.5)
        still = []
        for run, proc, handle, t0 in active:
            if proc.poll() is None:
                still.append((run, proc, handle, t0))
                continue
            handle.close()
            ok = proc.returncode == 0 and run_status(os.path.join(sweep.root, run.name)) == "finished"
            results[run.name] = {"status": "finished" if ok else "failed", "returncode": proc.returncode,
                                 "seconds": round(time.time() - t0, 1),
                                 "log": os.path.join(sweep.root, f"{run.name}.log")}
            log(f"[sweep] {run.name}: {results[run.name]['status']} in {results[run.name]['seconds']} s")
            write_manifest(sweep, results)
        active = still
    write_manifest(sweep, results)
    return results


def submit_slurm(sweep: Sweep, opts, command: List[str], throttle: Optional[int] = None,
                 log=print) -> Dict[str, Dict[str, Any]]:
    """Submit the sweep's pending runs as one Slurm job array (`opts`: moe.launch.LaunchOptions
    without config/array); with opts.wait, wait for it and record each run's final status."""

    pending, results = pending_runs(sweep, log)
    if not pending:
        log("[sweep] nothing to submit: every run is finished or still in Slurm")
        if not opts.dry_run:
            write_manifest(sweep, results)
        return results
    index = {run.name: i for i, run in enumerate(sweep.runs)}
    ids = [index[run.name] for run in pending]
    opts.array = ",".join(map(str, ids)) + (f"%{throttle}" if throttle else "")
    opts.job_name = opts.job_name or f"moe-sweep-{sweep.name}"
    check_options(opts)
    # progress bars only clutter job logs; threads come from the job's OMP_NUM_THREADS
    cfgs = [(i, load_config(sweep.base, run.args + ["logging.progress=false"])) for i, run in zip(ids, pending)]
    try:
        tasks = check_tasks(opts, cfgs)
    except ConfigError as exc:
        raise ConfigError(f"{sweep.path}: {exc}") from None
    # every run's plan against the job's GPUs: one that does not fit stops the whole array here, unless --force
    for line in check_plans(opts, tasks, cuda_available=False):
        log(line)
    job_id = submit(opts, tasks, sweep.root, command)
    if job_id is None:  # dry run
        return results
    logs = os.path.join(sweep.root, "logs")
    for i, run in zip(ids, pending):
        results[run.name] = {"status": "submitted", "job_id": job_id, "task_id": i,
                             "log": os.path.join(logs, f"slurm-{job_id}_{i}.out")}
    write_manifest(sweep, results)
    log(f"[sweep] submitted {len(pending)} run(s) as Slurm array job {job_id} (tasks {opts.array}); "
        f"`moe sweep {sweep.path} --slurm ...` again skips finished and in-flight runs")
    if opts.wait:
        wait_for_job(job_id)
        for run in pending:
            ok = run_status(os.path.join(sweep.root, run.name)) == "finished"
            results[run.name]["status"] = "finished" if ok else "failed"
            log(f"[sweep] {run.name}: {results[run.name]['status']}")
        write_manifest(sweep, results)
    return results


def wandb_sweep_config(sweep: Sweep) -> Dict[str, Any]:
    """A W&B sweep config (grid) equivalent to this sweep, for users who prefer `wandb agent`."""
    parameters: Dict[str, Any] = {}
    by_key: Dict[str, list] = {}
    for run in sweep.runs:
        for k, v in run.overrides.items():
            by_key.setdefault(k, [])
            if v not in by_key[k]:
                by_key[k].append(v)
    for k, values in by_key.items():
        parameters[k] = {"values": values}
    return {
        "name": sweep.name,
        "method": "grid",
        "metric": {"name": "loss/val", "goal": "minimize"},
        "parameters": parameters,
        # ${args_no_hyphens} expands to key=value pairs: exactly moe's dotted overrides
        "command": ["${env}", "${interpreter}", "-m", "moe.cli", "train", os.path.abspath(sweep.base),
                    *sweep.common, f"logging.wandb.group={sweep.name}", "${args_no_hyphens}"],
    }
