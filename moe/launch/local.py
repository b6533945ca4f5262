"""The local launcher (`moe launch --local N`): `torchrun --standalone` on this machine, no Slurm.

It runs in the foreground and writes `launch_local.sh` (the same command again, which resumes from the
latest checkpoint). SIGTERM, Ctrl-C (SIGINT) or SIGHUP stops the run cleanly: the trainers save a
checkpoint and `moe launch` exits 0 (see `_LocalRun`); nothing restarts a local run by itself.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence

import psutil

from moe.io import RunFolder, redact
from moe.launch.base import Launcher
from moe.launch.options import LaunchOptions, Task
from moe.launch.run_folder import prepare_run_dirs, record_launch, write
from moe.launch.script import env_exports, quote
from moe.launch.snapshot import write_code_snapshot
from moe.metrics import training_env


class LocalLauncher(Launcher):
    """`moe launch --local N`: the (single) task here, with N processes."""

    name = "local"

    def start(self, opts: LaunchOptions, tasks: List[Task], command: Sequence[str], stamp: str) -> int:
        return launch_local(opts, tasks[0], command, stamp)


def torchrun_command(opts: LaunchOptions, task: Task, log_dir: str) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={opts.local}",
            f"--max-restarts={opts.max_restarts}", f"--log-dir={log_dir}", "--redirects=3", "--tee=3",
            "-m", "moe.cli", "train", task.config_path]


def local_script(opts: LaunchOptions, command: Sequence[str], stamp: str, cmd: Sequence[str]) -> str:
    """launch_local.sh: runs `cmd` (the torchrun) again from this folder, with the --env settings."""
    return ("#!/bin/bash\n# Written by `moe launch --local` on " + stamp + ":\n#   "
            + " ".join(quote(c) for c in command) + "\n# Run it again to resume from the latest checkpoint.\n"
            + f"set -euo pipefail\ncd {quote(os.getcwd())}\n" + "".join(line + "\n" for line in env_exports(opts.env))
            + " ".join(quote(c) for c in cmd) + "\n")


def launch_local(opts: LaunchOptions, task: Task, command: Sequence[str], stamp: str) -> int:
    """torchrun --standalone on this machine, in the foreground. SIGTERM, Ctrl-C (SIGINT) or SIGHUP
    stops it cleanly: the trainers save a checkpoint and the exit status is 0 (see `_LocalRun`)."""
    log_dir = os.path.join(task.run_dir, "logs", f"local-{stamp}")
    cmd = torchrun_command(opts, task, log_dir)
    script = local_script(opts, command, stamp, cmd)
    if opts.dry_run:
        print(redact(script), end="")
        print(f"# dry run: nothing written, nothing started; the run would train {task.config_path}",
              file=sys.stderr)
        return 0
    prepare_run_dirs([task])
    write(os.path.join(task.run_dir, "launch_local.sh"), script, mode=0o755)
    write_code_snapshot(task.run_dir, stamp)
    record_launch(task.run_dir, {"local": opts.local, "time": stamp, "command": list(command),
                                 "configs": [task.config_path], "options": asdict(opts)})
    print(f"[moe launch] local: {opts.local} process(es) on this machine, config {task.config_path}, "
          f"rank logs {log_dir}", flush=True)
    env = training_env(dict(e.split("=", 1) for e in opts.env))
    env.pop("SLURM_JOB_ID", None)  # inside an allocation too, a stop signal must not requeue it
    run = _LocalRun()
    started = time.time()
    code = run.run(cmd, env)
    if not run.stop_signal:
        return code
    return _stopped_status(task, run.stop_signal, code, started)


def _stopped_status(task: Task, stop_signal: int, code: int, started: float) -> int:
    """The exit status of `moe launch --local` after a stop request, and what it prints about it."""
    status = _summary_status(task.run_dir, since=started)
    if status == "preempted":
        print(f"[moe launch] stopped on {signal.Signals(stop_signal).name} as asked, checkpoint saved; "
              f"the same command (or bash {os.path.join(task.run_dir, 'launch_local.sh')}) resumes it", flush=True)
        return 0
    if status == "finished":  # it ended by itself as the request came
        return code
    print(f"[moe launch] stopped on {signal.Signals(stop_signal).name} without a final checkpoint "
          f"(run status {status or 'unknown'}, torchrun exit {code})", file=sys.stderr, flush=True)
    return code or 1


def _summary_status(run_dir: str, since: float) -> Optional[str]:
    """The status in the run's summary.json if the trainer wrote it after `since`, else None."""
    path = RunFolder(run_dir).summary
    try:
        if os.path.getmtime(path) < since:
            return None
        with open(path) as f:
            return json.load(f).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _torchrun_child_setup() -> None:
    """In the torchrun child before exec: a process group of its own, so that a Ctrl-C at the
    terminal reaches `moe launch` only (which turns it into a clean stop), and USR2 ignored (its
    default action would kill torchrun; the trainers install their own handler)."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class _LocalRun:
    """The torchrun of `moe launch --local` and the signals this process passes on to it.

    torchrun starts each worker (trainer rank) in a session of its own, and on SIGTERM or SIGINT it
    raises (a traceback), kills its workers and exits 1, so a stop request is sent to the workers
    directly: SIGTERM (also for SIGINT and SIGHUP) makes every rank save a checkpoint at the next
    step and exit 0, after which torchrun exits 0 too; USR2 is passed on as is. A second stop
    request kills the whole run at once."""

    STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self.stop_signal = 0  # the first stop request (SIGTERM, SIGINT, SIGHUP), 0 if none
        self._pending: List[int] = []  # received before torchrun started

    def run(self, cmd: Sequence[str], env: Dict[str, str]) -> int:
        """Start torchrun and wait for it, passing on the stop signals meanwhile; its exit status
        (killed by a signal: 128 + the signal's number, the shell's convention)."""
        previous = {s: signal.signal(s, self.handle) for s in self.STOPS}
        try:
            self.start(cmd, env)
            code = self.proc.wait()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        return 128 - code if code < 0 else code

    def start(self, cmd: Sequence[str], env: Dict[str, str]) -> None:
        self.proc = subprocess.Popen(list(cmd), env=env, stdin=subprocess.DEVNULL, preexec_fn=_torchrun_child_setup)
        for sig in self._pending:
            self._deliver(sig)
        self._pending = []

    def handle(self, sig: int, _frame) -> None:
        if self.proc is None:
            self._pending.append(sig)
        else:
            self._deliver(sig)

    def _workers(self) -> list:
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return []

    def _signal_workers(self, sig: int) -> bool:
        """Send `sig` to torchrun's workers; False when it has none (yet or any more)."""
        sent = False
        for worker in self._workers():
            try:
                worker.send_signal(sig)
                sent = True
            except psutil.Error:
                pass
        return sent

    def _signal_torchrun(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except OSError:
            pass

    def _deliver(self, sig: int) -> None:
        if sig == signal.SIGUSR2:  # the checkpoint-and-stop request of Slurm goes to the trainers as is
            self._signal_workers(sig)
            return
        name = signal.Signals(sig).name
        if self.stop_signal:
            print(f"[moe launch] {name} again: killing the run now", file=sys.stderr, flush=True)
            for worker in self._workers():  # each worker leads a process group of its own
                try:
                    os.killpg(worker.pid, signal.SIGKILL)
                except OSError:
                    pass
            self._signal_torchrun(signal.SIGKILL)
            return
        self.stop_signal = sig
        print(f"[moe launch] {name}: asking the training to save a checkpoint and stop "
              f"(send it again to kill it at once)", file=sys.stderr, flush=True)
        if not self._signal_workers(signal.SIGTERM):  # no worker yet: nothing to save, end torchrun
            self._signal_torchrun(signal.SIGTERM)
