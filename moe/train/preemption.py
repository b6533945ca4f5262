"""Stopping a run cleanly on a signal, and asking the launcher what happens next.

SIGUSR2 is Slurm's warning before the time limit (`#SBATCH --signal=USR2@120`, or `scancel
--signal=USR2 JOBID`); SIGTERM is a cancel, a time limit or a preemption; SIGINT (Ctrl-C) stops like
SIGTERM, and a second Ctrl-C aborts at once. The handler only sets a flag. At each step boundary every
rank learns whether any rank was signalled (one all-reduce, which also carries whether any rank's loss
went non-finite), so all ranks stop after the same step; the loop then saves a checkpoint and ends.

What happens after a SIGUSR2 stop is the launcher's answer, not training's: the job-side launcher
object (`moe.launch.job_launcher()`, passed in by the CLI) restarts the job later (Slurm: `scontrol
requeue`, whose next start resumes from that checkpoint), or there is none and the run just ends.
SIGTERM and SIGINT never ask for a restart: they are how `scancel`, time limits and a user end a job,
and Slurm requeues preempted jobs itself.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Dict, Optional, Protocol

import torch
import torch.distributed as dist


class JobControl(Protocol):
    """What the launcher of this process does about a run stopped by a preemption warning. Launchers
    (moe/launch/) provide it; training only calls it, so it never depends on a launcher."""

    name: str

    def resume_later(self) -> str:
        """Arrange for this job to start again (it resumes from the checkpoint just saved); returns
        the line to print. May end this process soon after (Slurm's requeue signals the job)."""


class Preemption:
    """Signal handling of one run (see the module docstring); `finish` ends it after the last write."""

    USR2, TERM = 1, 2  # stop codes; TERM wins when both arrive, so a cancel never turns into a requeue
    NAMES = {USR2: "SIGUSR2", TERM: "SIGTERM"}

    def __init__(self, launcher: Optional[JobControl] = None) -> None:
        self.launcher = launcher
        self.received = 0  # on this rank
        self.stopped = 0  # agreed by all ranks at the last step boundary
        self.interrupted = False
        self._previous: Dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt  # the second Ctrl-C: abort now, without saving
            self.interrupted = True
            if int(os.environ.get("RANK", "0")) == 0:
                print("\n[moe] Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again to abort "
                      "without saving)", flush=True)
        self.received = max(self.received, self.TERM if signum in (signal.SIGTERM, signal.SIGINT) else self.USR2)

    def signal_name(self) -> str:
        return "SIGINT" if self.interrupted and self.stopped == self.TERM else self.NAMES.get(self.stopped, "-")

    def requested(self, device: torch.device, diverged: bool = False):
        """(stop requested on any rank, loss non-finite on any rank). Collective: call on every rank
        at the same step boundary."""
        flags = [self.received, int(diverged)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor(flags, dtype=torch.int32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = [int(v) for v in t.tolist()]
        self.stopped = flags[0]
        return flags[0] > 0, bool(flags[1])

    def finish(self, rank: int, step: int) -> None:
        """After the run's last write. Asking for a restart may end the job at once, so it comes last."""
        if self.stopped and rank == 0:
            print(f"[moe] stopped after step {step} on {self.signal_name()}; checkpoint saved", flush=True)
        if self.stopped == self.USR2 and self.launcher is not None:
            if rank == 0:
                if "wandb" in sys.modules:  # stop W&B's service now: a requeue ends every process of the job
                    sys.modules["wandb"].teardown()
                print(self.launcher.resume_later(), flush=True)
            return  # keep the handlers: the launcher's SIGTERM for the restart must not kill this exiting process
        self.restore()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
