"""The Slurm launcher: write the run folders and the job script, `sbatch` it, optionally wait.

Submit side: `submit` writes `job_dir/submit.sbatch` (moe/launch/script.py), the run folders and their
code snapshots, sbatches the script and prints the job id and the log paths. The job script can be
resubmitted unchanged; every start of it resumes from the run's latest checkpoint.

Job side: inside a Slurm job (SLURM_JOB_ID set) a run stopped by the time-limit warning (SIGUSR2)
is requeued with `scontrol requeue`, and its next start resumes from the checkpoint just saved.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from typing import List, Mapping, Optional, Sequence

from moe.io import RunFolder, redact
from moe.launch.base import Launcher
from moe.launch.cluster import have, wait_for_job
from moe.launch.errors import LaunchError
from moe.launch.options import LaunchOptions, Task
from moe.launch.run_folder import prepare_run_dirs, record_launch, write
from moe.launch.script import render_sbatch
from moe.launch.snapshot import write_code_snapshot
from moe.metrics import training_env


def sbatch(script_path: str) -> str:
    if not have("sbatch"):
        raise LaunchError("sbatch not found: this machine is not a Slurm login node (try --local N, or "
                          "launch/local_cluster.sh up for a local test cluster)")
    # the job inherits this environment (sbatch --export=ALL)
    proc = subprocess.run(["sbatch", "--parsable", script_path], capture_output=True, text=True, env=training_env())
    if proc.returncode != 0:
        raise LaunchError("sbatch failed:\n" + (proc.stderr.strip() or proc.stdout.strip()))
    return proc.stdout.strip().split(";")[0]


def job_dir_of(tasks: List[Task]) -> str:
    """The folder of the job's script and job logs: the run folder of a single run; for an array
    job a folder of its own, next to the task folders (`<name>` of the tasks' `<name>_<id>`)."""
    if len(tasks) == 1:
        return tasks[0].run_dir
    first = tasks[0]
    return os.path.join(first.cfg.run.root, first.cfg.run.name[:-len(f"_{first.task_id}")])


def submit(opts: LaunchOptions, tasks: List[Task], job_dir: str, command: Sequence[str],
           stamp: Optional[str] = None) -> Optional[str]:
    """Write the run folders and `job_dir/submit.sbatch` for checked tasks (one job, or one array
    task each when `opts.array` is set) and sbatch it; returns the job id, None on a dry run."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    script_path = os.path.join(job_dir, "submit.sbatch")
    script = render_sbatch(opts, tasks, script_path, job_dir, command)
    if opts.dry_run:
        print(redact(script), end="")
        print(f"# dry run: nothing written, nothing submitted; the job would train "
              f"{', '.join(t.config_path for t in tasks)}", file=sys.stderr)
        return None

    prepare_run_dirs(tasks)
    os.makedirs(os.path.join(job_dir, "logs"), exist_ok=True)
    write(script_path, script, mode=0o755)
    for t in tasks:
        write_code_snapshot(t.run_dir, stamp)
    job_id = sbatch(script_path)
    record_launch(job_dir, {"job_id": job_id, "time": stamp, "command": list(command), "script": script_path,
                            "configs": [t.config_path for t in tasks], "options": asdict(opts)})
    _print_submitted(opts, tasks, job_dir, script_path, job_id)
    return job_id


def _print_submitted(opts: LaunchOptions, tasks: List[Task], job_dir: str, script_path: str, job_id: str) -> None:
    logs = os.path.join(job_dir, "logs")
    out = f"slurm-{job_id}_<task>.out" if opts.array else f"slurm-{job_id}.out"
    print(f"submitted job {job_id}: {opts.nodes} node(s) x {opts.gpus_per_node} process(es), "
          f"{len(tasks)} run(s)")
    print(f"  script:     {script_path}  (resubmit with: sbatch {script_path})")
    run_dirs = [t.run_dir for t in tasks]
    if len(tasks) > 1 and len({os.path.dirname(d) for d in run_dirs}) == 1:
        print(f"  runs:       {', '.join(os.path.basename(d) for d in run_dirs)}")
        run_dirs = [os.path.join(os.path.dirname(run_dirs[0]), "<run>")]
    print(f"  config:     {', '.join(os.path.join(d, 'config.yaml') for d in run_dirs)}")
    print(f"  job log:    {os.path.join(logs, out)}")
    job = "<task's job id>" if opts.array else job_id
    print(f"  rank logs:  {', '.join(os.path.join(d, 'logs', job, 'restart_<n>') for d in run_dirs)}")
    print(f"  metrics:    {', '.join(os.path.join(d, 'metrics.jsonl') for d in run_dirs)}")
    sys.stdout.flush()


def wait_and_summarise(job_id: str, tasks: List[Task]) -> bool:
    """Wait for the job to end and print each run's final state; True if every task completed."""
    ok = wait_for_job(job_id)
    for t in tasks:
        summary = RunFolder(t.run_dir).summary
        if os.path.isfile(summary):
            s = json.load(open(summary))
            print(f"[moe launch] {t.cfg.run.name}: {s.get('status')}, step {s.get('steps')}, "
                  f"train loss {s.get('train_loss')}, val loss {s.get('val_loss')}")
    return ok


REQUEUE_DRAIN_S = 2.0
"""Seconds between the last line a stopped run prints and the requeue that ends the job."""


class SlurmJob:
    """The JobControl of a process inside Slurm job `job_id`: a stopped run is requeued."""

    name = "slurm"

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id

    def resume_later(self) -> str:
        """`scontrol requeue` this job (Slurm then ends every process of it, and its next start
        resumes from the latest checkpoint); returns the line to print."""
        job = self.job_id
        # the job's log is torchrun's copy of each rank's output, read a moment later: the requeue
        # kills that reader at once, so give it time to copy the lines just printed (the stop)
        time.sleep(REQUEUE_DRAIN_S)
        # an accepted requeue makes Slurm SIGTERM every process of the job at once, scontrol included:
        # it ignores TERM (inherited through exec) so that its exit status is the requeue's answer
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                              preexec_fn=_ignore_sigterm)
        if proc.returncode == 0:
            return f"[moe] requeued Slurm job {job}"
        if proc.returncode < 0:
            return (f"[moe] scontrol requeue {job} ended by {signal.Signals(-proc.returncode).name} "
                    f"before answering (the job is ending)")
        return (f"[moe] scontrol requeue {job} failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()}")


def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class SlurmLauncher(Launcher):
    """`moe launch` without --local: one Slurm job (an array job with --array), `--wait` for its end."""

    name = "slurm"

    def start(self, opts: LaunchOptions, tasks: List[Task], command: Sequence[str], stamp: str) -> int:
        job_id = submit(opts, tasks, job_dir_of(tasks), command, stamp)
        if job_id is None or not opts.wait:
            return 0
        return 0 if wait_and_summarise(job_id, tasks) else 1

    @classmethod
    def job_control(cls, environ: Mapping[str, str]) -> Optional[SlurmJob]:
        job = environ.get("SLURM_JOB_ID")
        return SlurmJob(job) if job else None
