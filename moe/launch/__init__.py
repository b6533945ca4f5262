"""`moe launch`: submit a training run to Slurm, or run it on this machine with torchrun.

One command does everything a reproducible multi-node run needs and fails before submitting on
anything it can check: it resolves and validates the config for the job's world size and checks the
options (moe/launch/options.py), writes the run folder `runs/<name>/` (resolved `config.yaml`, the
job script from moe/launch/job.sbatch, a code snapshot without secret files, `launch.json`), then
submits it (Slurm: moe/launch/slurm.py) or runs it here (`--local N`: moe/launch/local.py). Secrets
are never written anywhere: jobs inherit them from the environment at run time.

Launchers sit behind one small interface (moe/launch/base.py), registered by name in `LAUNCHERS`: a
new one is one module plus one line there. `launch()` is the submit side; `job_launcher()` is the job
side, asked by a training process what restarts it after a preemption warning.
`python -m moe.launch world-info HOSTFILE` is the hostfile helper of the job script (hosts.py).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Dict, Mapping, Optional, Sequence, Type

from moe.io import REDACTED, SECRET_NAME, atomic_write, redact, secret_values
from moe.launch.base import JobControl, Launcher
from moe.launch.cluster import (ACTIVE_STATES, active_array_tasks, job_states, partition_has_gpus,
                                slurm_partitions, wait_for_job)
from moe.launch.errors import LaunchError
from moe.launch.hosts import main, read_hostfile, world_info
from moe.launch.local import LocalLauncher
from moe.launch.options import (LaunchOptions, Task, check_options, check_plans, check_tasks, parse_array_spec,
                                plan_layout, resolve_tasks, world_size)
from moe.launch.script import TEMPLATE, render_sbatch
from moe.launch.slurm import SlurmJob, SlurmLauncher, sbatch, submit, wait_and_summarise
from moe.launch.snapshot import (ROOT, SECRET_CONTENT, SECRET_DIR_NAMES, SECRET_FILE_NAMES, secret_file_reason,
                                 write_code_snapshot)

# the launchers by name; `moe launch` picks "local" with --local N, else "slurm"
LAUNCHERS: Dict[str, Type[Launcher]] = {
    SlurmLauncher.name: SlurmLauncher,
    LocalLauncher.name: LocalLauncher,
}


def get_launcher(name: str) -> Launcher:
    if name not in LAUNCHERS:
        raise LaunchError(f"unknown launcher {name!r}; known: {', '.join(LAUNCHERS)}")
    return LAUNCHERS[name]()


def launch(opts: LaunchOptions, argv: Sequence[str] = ()) -> int:
    """The `moe launch` command; returns the exit status."""
    check_options(opts)
    tasks = resolve_tasks(opts)
    for line in check_plans(opts, tasks, cuda_available()):  # a run that does not fit stops here, unless --force
        print(line, file=sys.stderr, flush=True)
    command = ["moe", "launch", *argv]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return get_launcher("local" if opts.local else "slurm").start(opts, tasks, command, stamp)


def cuda_available() -> bool:
    """Whether this machine has a CUDA device (for `moe launch --local`'s plan check)."""
    import torch

    return torch.cuda.is_available()


def job_launcher(environ: Optional[Mapping[str, str]] = None) -> Optional[JobControl]:
    """For the current process (`environ`: default os.environ), the JobControl of the launcher that
    will restart it after a preemption warning (inside a Slurm job: requeue it), or None when
    nothing will (a plain local run, `moe launch --local` included)."""
    environ = os.environ if environ is None else environ
    for launcher in LAUNCHERS.values():
        control = launcher.job_control(environ)
        if control is not None:
            return control
    return None


__all__ = [
    # the interface
    "JobControl", "LaunchError", "Launcher", "LAUNCHERS", "get_launcher", "job_launcher", "launch",
    "LocalLauncher", "SlurmJob", "SlurmLauncher",
    # options and tasks
    "LaunchOptions", "Task", "check_options", "check_plans", "check_tasks", "cuda_available", "parse_array_spec",
    "plan_layout", "resolve_tasks", "world_size",
    # the job script, the code snapshot
    "ROOT", "TEMPLATE", "render_sbatch", "SECRET_CONTENT", "SECRET_DIR_NAMES", "SECRET_FILE_NAMES",
    "secret_file_reason", "write_code_snapshot",
    # Slurm
    "ACTIVE_STATES", "active_array_tasks", "job_states", "partition_has_gpus", "sbatch", "slurm_partitions",
    "submit", "wait_and_summarise", "wait_for_job",
    # hostfiles
    "main", "read_hostfile", "world_info",
    # from moe.io, as before
    "REDACTED", "SECRET_NAME", "atomic_write", "redact", "secret_values",
]
