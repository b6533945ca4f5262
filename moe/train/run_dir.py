"""The run folder, `<run.root>/<run.name>/`: whether this run may use it, creating it, and summary.json.

A folder belongs to one run: reusing it with a different config (other than the keys that only extend
or re-log a run, RESUMABLE_KEYS) or starting over on its checkpoints is refused unless run.overwrite
is set, and then the old run is moved aside, never deleted. `check_run_dir` writes nothing, so
`moe launch` runs it before it submits.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict

from moe.config import Config, ConfigError, config_from_yaml_text, to_dict, to_yaml
from moe.io import RunFolder, atomic_write
from moe.train.checkpoint.folders import list_steps, step_tag

# Keys whose change does not make a run folder "another run": extending or re-logging a run is fine,
# and so is resuming at another parallel layout (checkpoints are layout-free, see moe/train/checkpoint/).
RESUMABLE_KEYS = ("train.steps", "train.eval_every", "train.log_every", "train.eval_batches", "train.eval_tasks",
                  "train.eval_tasks_limit", "train.eval_include_path", "logging",
                  "checkpoint", "run.overwrite", "train.threads", "train.keep_freed_memory", "parallel",
                  "train.zero_stage")


def _flatten(d: dict, prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(old: Config, new: Config) -> list:
    """The dotted keys in which two configs describe different runs (RESUMABLE_KEYS aside)."""
    a, b = _flatten(to_dict(old)), _flatten(to_dict(new))
    # 0 is "from the tokenizer": either side may hold the resolved value (the stored config after a
    # run started, the live one after the data was built), and it follows from the data keys anyway
    if b["model.vocab_size"] == 0:
        b["model.vocab_size"] = a.get("model.vocab_size")
    if a.get("model.vocab_size") == 0:
        a["model.vocab_size"] = b["model.vocab_size"]
    return sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS))


def check_run_dir(cfg: Config) -> bool:
    """Whether runs/<name>/ must be moved aside before this run uses it; a ConfigError when it may
    not be used at all. Writes nothing (`moe launch` runs it before submitting).

    Refused without run.overwrite=true: a folder that holds a run with a different config, and
    checkpoint.resume=false on a folder that holds checkpoints (starting over would replace them)."""
    folder = RunFolder.of(cfg.run.root, cfg.run.name)
    run_dir = folder.path
    steps = list_steps(folder.checkpoints)
    if not cfg.checkpoint.resume and steps:
        if not cfg.run.overwrite:
            raise ConfigError(
                f"checkpoint.resume=false, but {run_dir}/checkpoints holds checkpoints "
                f"({', '.join(step_tag(s) for s in steps[-3:])}): starting over would replace them; "
                f"pass run.overwrite=true to move the old run aside, or choose another run.name")
        return True
    if not os.path.isfile(folder.config):
        return False
    try:
        diff = config_differences(config_from_yaml_text(open(folder.config).read()), cfg)
    except ConfigError as exc:
        diff = [f"(unreadable: {exc})"]
    if diff and not cfg.run.overwrite:
        raise ConfigError(
            f"{run_dir} already holds a run with a different config (differs in: {', '.join(diff[:8])}); "
            f"choose another run.name or pass run.overwrite=true to move the old run aside")
    return bool(diff)


def prepare_run_dir(cfg: Config, is_writer: bool, defer_config: bool = False) -> str:
    """Create runs/<name>/, or reuse it when `check_run_dir` allows. Never deletes a previous run:
    with run.overwrite=true a refused old run is moved aside to <name>.old-<time>. `defer_config`
    leaves an existing folder's config.yaml for the caller to rewrite once resuming has worked."""
    folder = RunFolder.of(cfg.run.root, cfg.run.name)
    if check_run_dir(cfg):
        _move_aside(folder.path, is_writer)
    if is_writer:
        os.makedirs(folder.path, exist_ok=True)
        if not (defer_config and os.path.isfile(folder.config)):  # train() rewrites it once resuming worked
            atomic_write(folder.config, to_yaml(cfg))
    return folder.path


def _move_aside(run_dir: str, is_writer: bool) -> None:
    if not is_writer:
        return
    aside = f"{run_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while os.path.exists(aside):  # two overwrites within a second must not collide
        aside, n = f"{run_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}", n + 1
    os.replace(run_dir, aside)
    print(f"moved the previous run in {run_dir} to {aside}")


def write_summary(run_dir: str, summary: Dict[str, Any], rank: int) -> None:
    """summary.json, on rank 0; non-finite numbers become null (JSON has no NaN)."""
    if rank != 0:
        return
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    atomic_write(RunFolder(run_dir).summary, json.dumps(clean, indent=2))
