"""The Slurm job script: `moe/launch/job.sbatch` (package data) with its {{PLACEHOLDERS}} filled in.

The template ships inside the package, so a wheel or `pip install .` has it; MOE_LAUNCH_TEMPLATE
points at another one. Secret values are never filled in: the job inherits them at run time.
"""
from __future__ import annotations

import datetime
import importlib.resources
import os
import re
import shlex
import sys
from typing import Dict, List, Sequence

from moe.launch.errors import LaunchError
from moe.launch.cluster import partition_has_gpus
from moe.launch.options import LaunchOptions, Task

TEMPLATE = os.environ.get("MOE_LAUNCH_TEMPLATE", str(importlib.resources.files("moe.launch") / "job.sbatch"))


def quote(value: str) -> str:
    return shlex.quote(value)


def env_exports(env: Sequence[str]) -> List[str]:
    """`export NAME=VALUE` lines for --env NAME=VALUE settings."""
    return [f"export {k}={quote(v)}" for k, v in (e.split("=", 1) for e in env)]


def sbatch_directives(opts: LaunchOptions, job_name: str, log_dir: str, gpus: bool) -> List[str]:
    d = [f"--job-name={job_name}", f"--nodes={opts.nodes}", "--ntasks-per-node=1"]
    if gpus:
        d.append(f"--gpus-per-node={opts.gpus_per_node}")
    if opts.cpus_per_task:
        d.append(f"--cpus-per-task={opts.cpus_per_task}")
    for flag, value in (("partition", opts.partition), ("account", opts.account), ("qos", opts.qos),
                        ("time", opts.time), ("constraint", opts.constraint), ("mem", opts.mem),
                        ("mail-user", opts.mail_user), ("mail-type", opts.mail_type)):
        if value:
            d.append(f"--{flag}={value}")
    if opts.exclusive:
        d.append("--exclusive")
    if opts.array:
        d.append(f"--array={opts.array}")
    out = "slurm-%A_%a.out" if opts.array else "slurm-%j.out"
    d += [f"--signal=USR2@{opts.signal_s}", "--requeue", "--open-mode=append",
          f"--output={os.path.join(log_dir, out)}", f"--chdir={os.getcwd()}"]
    d += list(opts.sbatch_args)
    return ["#SBATCH " + x for x in d]


def run_selection(tasks: List[Task]) -> str:
    """The lines that set MOE_RUN_DIR and MOE_CONFIG: of the one run, or of this array task's."""
    if tasks[0].task_id is None:
        t = tasks[0]
        return f"export MOE_RUN_DIR={quote(t.run_dir)}\nexport MOE_CONFIG={quote(t.config_path)}"
    lines = ["# array job: each task trains its own run folder",
             'case "$SLURM_ARRAY_TASK_ID" in']
    for t in tasks:
        lines.append(f"    {t.task_id}) export MOE_RUN_DIR={quote(t.run_dir)} MOE_CONFIG={quote(t.config_path)} ;;")
    lines.append('    *) echo "[moe launch] no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;')
    lines.append("esac")
    return "\n".join(lines)


def _values(opts: LaunchOptions, tasks: List[Task], script_path: str, job_dir: str,
            command: Sequence[str]) -> Dict[str, str]:
    """What each placeholder of the template is replaced by."""
    gpus = not opts.cpu
    if opts.cpu is None:
        has = partition_has_gpus(opts.partition)
        gpus = True if has is None else has
    job_name = opts.job_name or f"moe-{tasks[0].cfg.run.name if len(tasks) == 1 else os.path.basename(job_dir)}"
    threads = max(1, opts.cpus_per_task // opts.gpus_per_node) if opts.cpus_per_task else 1
    return {
        "SBATCH": "\n".join(sbatch_directives(opts, job_name, os.path.abspath(os.path.join(job_dir, "logs")), gpus)),
        "DATE": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        "COMMAND": " ".join(quote(c) for c in command),
        "SCRIPT": os.path.abspath(script_path),
        "SIGNAL_S": str(opts.signal_s),
        "PYTHON": quote(sys.executable),
        "LAUNCHER": opts.launcher,
        "NPROC_PER_NODE": str(opts.gpus_per_node),
        "MAX_RESTARTS": str(opts.max_restarts),
        "RUN_SELECTION": run_selection(tasks),
        "OMP_NUM_THREADS": str(threads),
        "EXTRA_ENV": "\n".join(env_exports(opts.env)) or "# (no --env settings)",
    }


def render_sbatch(opts: LaunchOptions, tasks: List[Task], script_path: str, job_dir: str,
                  command: Sequence[str]) -> str:
    """The job script, from moe/launch/job.sbatch."""
    if not os.path.isfile(TEMPLATE):
        raise LaunchError(f"job script template not found: {TEMPLATE} (set MOE_LAUNCH_TEMPLATE to a job.sbatch, "
                          f"or reinstall moe: it ships as moe/launch/job.sbatch)")
    values = _values(opts, tasks, script_path, job_dir, command)
    text = open(TEMPLATE).read()
    # the template's own header comment is for readers of launch/, not of the job script
    lines = text.splitlines(keepends=True)
    text = lines[0] + "".join(lines[3:])
    text += "" if text.endswith("\n") else "\n"

    def fill(m: "re.Match[str]") -> str:
        if m.group(1) not in values:
            raise LaunchError(f"{TEMPLATE}: unknown placeholder {m.group(0)}")
        return values[m.group(1)]

    return re.sub(r"\{\{([A-Z_]+)\}\}", fill, text)
