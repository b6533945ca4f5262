"""The options of `moe launch`, their checks, and the tasks (config + run folder) a launch trains.

Everything here fails before any file is written: `check_options` checks the launch itself (node
counts, launcher, --env, --array, the partition via `sinfo`), `resolve_tasks` loads the config of
every run (one per array task) and `check_tasks` validates each for the job's world size and checks
it against what its run folder already holds.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from moe.config import Config, ConfigError, load_config
from moe.io import SECRET_NAME, RunFolder
from moe.launch.errors import LaunchError
from moe.launch.cluster import slurm_partitions
from moe.train.plan import Layout, estimate, one_line, parse_memory, vocab_known
from moe.train.run_dir import check_run_dir
from moe.validate import validate


@dataclass
class LaunchOptions:
    config: str
    overrides: List[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 1
    local: int = 0
    """>0: run here with torchrun --standalone and this many processes; no Slurm."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: bool = False
    mail_user: Optional[str] = None
    mail_type: Optional[str] = None
    cpus_per_task: int = 0
    mem: Optional[str] = None
    job_name: Optional[str] = None
    cpu: Optional[bool] = None
    """True: nodes have no GPU (request none); None: decide from the partition's GRES (sinfo)."""
    launcher: str = "torchrun"
    max_restarts: int = 0
    signal_s: int = 120
    array: Optional[str] = None
    env: List[str] = field(default_factory=list)
    sbatch_args: List[str] = field(default_factory=list)
    dry_run: bool = False
    wait: bool = False
    force: bool = False
    """Submit even when `moe plan` says the run does not fit the GPUs' memory."""
    gpu_memory: str = "80GB"
    """Memory of one GPU, for the plan's fit check (`moe plan --gpu-memory`)."""


@dataclass
class Task:
    """One training run of the job: its config and run folder (an array job has several)."""

    cfg: Config
    task_id: Optional[int] = None

    @property
    def run_dir(self) -> str:
        return os.path.join(self.cfg.run.root, self.cfg.run.name)

    @property
    def config_path(self) -> str:
        return RunFolder(self.run_dir).config


def parse_array_spec(spec: str) -> Tuple[List[int], Optional[int]]:
    """Slurm's --array syntax: `0-7`, `0-15:4`, `1,3,8-9`, optionally `%N` (at most N at once)."""
    m = re.fullmatch(r"([0-9,:\-]+)(?:%(\d+))?", spec.strip())
    if not m:
        raise LaunchError(f"--array {spec!r}: expected Slurm's syntax, e.g. 0-7, 0-15:4, 1,3,5 or 0-7%2")
    ids: List[int] = []
    for part in m.group(1).split(","):
        r = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if not r:
            raise LaunchError(f"--array {spec!r}: cannot read {part!r}")
        lo = int(r.group(1))
        hi = int(r.group(2)) if r.group(2) is not None else lo
        step = int(r.group(3) or 1)
        if hi < lo or step < 1:
            raise LaunchError(f"--array {spec!r}: empty range {part!r}")
        ids.extend(range(lo, hi + 1, step))
    if len(set(ids)) != len(ids):
        raise LaunchError(f"--array {spec!r}: a task id appears twice")
    throttle = int(m.group(2)) if m.group(2) else None
    if throttle == 0:
        raise LaunchError(f"--array {spec!r}: %0 would never run a task")
    return sorted(ids), throttle


def world_size(opts: LaunchOptions) -> int:
    return opts.local if opts.local > 0 else opts.nodes * opts.gpus_per_node


def check_options(opts: LaunchOptions) -> None:
    """Everything about the launch itself that can be wrong, before any file is written."""
    if opts.local < 0:
        raise LaunchError(f"--local must be >= 1 processes, got {opts.local}")
    if opts.local and opts.array:
        raise LaunchError("--array needs Slurm; it cannot be combined with --local")
    if not opts.local:
        if opts.nodes < 1:
            raise LaunchError(f"--nodes must be >= 1, got {opts.nodes}")
        if opts.gpus_per_node < 1:
            raise LaunchError(f"--gpus-per-node must be >= 1, got {opts.gpus_per_node}")
    if opts.launcher not in ("torchrun", "deepspeed"):
        raise LaunchError(f"--launcher must be torchrun or deepspeed, got {opts.launcher!r}")
    if opts.launcher == "deepspeed" and opts.max_restarts:
        raise LaunchError("--max-restarts needs --launcher torchrun (the deepspeed launcher does not restart workers)")
    if opts.max_restarts < 0:
        raise LaunchError(f"--max-restarts must be >= 0, got {opts.max_restarts}")
    if opts.signal_s < 0:
        raise LaunchError(f"--signal-seconds must be >= 0, got {opts.signal_s}")
    if opts.cpus_per_task < 0:
        raise LaunchError(f"--cpus-per-task must be >= 0, got {opts.cpus_per_task}")
    _check_env(opts.env)
    if opts.array:
        parse_array_spec(opts.array)
    if opts.partition and not opts.local:
        known = slurm_partitions()
        if known is not None and opts.partition not in known:
            raise LaunchError(f"--partition {opts.partition!r}: unknown partition; sinfo knows: {', '.join(known)}")


def _check_env(env: Sequence[str]) -> None:
    """--env NAME=VALUE settings, which are written into the job script: never a secret's."""
    for item in env:
        key = item.split("=", 1)[0]
        if "=" not in item or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LaunchError(f"--env {item!r}: expected NAME=VALUE")
        if SECRET_NAME.search(key):
            raise LaunchError(f"--env {key}: looks like a secret and would be written into the job script; "
                              f"export it in the environment instead (jobs inherit it at run time)")


def resolve_tasks(opts: LaunchOptions) -> List[Task]:
    """The validated config of every run the job trains. With --array, `{task}` in an override is
    replaced by the array task id, and each task gets its own run folder `<name>_<id>`."""
    if not opts.array:
        return check_tasks(opts, [(None, load_config(opts.config, opts.overrides))])
    ids, _ = parse_array_spec(opts.array)
    cfgs = []
    for i in ids:
        cfg = load_config(opts.config, [o.replace("{task}", str(i)) for o in opts.overrides])
        cfg.run.name = f"{cfg.run.name}_{i}"
        cfgs.append((i, cfg))
    return check_tasks(opts, cfgs)


def check_tasks(opts: LaunchOptions, cfgs: Sequence[Tuple[Optional[int], Config]]) -> List[Task]:
    """Tasks from (array task id, config) pairs, each validated for the job's world size and checked
    against what its run folder already holds (the check of the trainer's `prepare_run_dir`, without
    writing: a folder of another run, or starting over a folder that holds checkpoints, is refused);
    two tasks may not share a run folder."""
    world = world_size(opts)
    tasks = []
    for task_id, cfg in cfgs:
        ep = cfg.parallel.ep_size
        where = f"--local {opts.local}" if opts.local else f"--nodes {opts.nodes} x --gpus-per-node {opts.gpus_per_node}"
        run = f"run {cfg.run.name}: " if task_id is not None else ""
        if ep >= 1 and world % ep:
            raise ConfigError(f"{run}parallel.ep_size ({ep}) must divide the world size {world} ({where})")
        try:
            validate(cfg, world)
            check_run_dir(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{run}{exc}") from None
        tasks.append(Task(cfg, task_id))
    names = [t.cfg.run.name for t in tasks]
    if len(set(names)) != len(names):
        raise LaunchError(f"array tasks share a run folder: {names}")
    return tasks


def plan_layout(opts: LaunchOptions, cuda_available: bool) -> Layout:
    """The layout `moe plan` checks a launch against: GPUs of --gpu-memory each, or CPU processes (--cpu,
    or --local on a machine without CUDA: the estimate is printed, nothing is checked)."""
    cpu = bool(opts.cpu) or (opts.local > 0 and not cuda_available)
    nodes, per_node = (1, opts.local) if opts.local else (opts.nodes, opts.gpus_per_node)
    return Layout(nodes=nodes, gpus_per_node=per_node, memory=parse_memory(opts.gpu_memory),
                  device="cpu" if cpu else "cuda")


def check_plans(opts: LaunchOptions, tasks: Sequence[Task], cuda_available: bool) -> List[str]:
    """The plan line of each task (printed by `moe launch`); a task that does not fit is refused with a
    LaunchError before anything is written or submitted, unless --force."""
    layout = plan_layout(opts, cuda_available)
    lines = []
    for t in tasks:
        run = f"run {t.cfg.run.name}: " if t.task_id is not None else ""
        if not vocab_known(t.cfg):  # resolved from the tokenizer at train time: nothing to plan with here
            lines.append(f"{run}[moe plan] not checked: set model.vocab_size (tokenizer {t.cfg.data.tokenizer!r}) "
                         f"to plan the run before it starts")
            continue
        plan = estimate(t.cfg, layout)
        if plan.fits is False and not opts.force:
            raise LaunchError(f"{run}{one_line(plan)[len('[moe plan] '):]}; nothing written or submitted "
                              f"(moe plan {opts.config} shows the terms; --force submits anyway)")
        lines.append(run + one_line(plan))
    return lines
