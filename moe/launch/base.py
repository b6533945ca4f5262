"""The launcher interface: what `moe launch` asks of a launcher, and what a running job asks of it.

A launcher (moe/launch/slurm.py, moe/launch/local.py) is a `Launcher` subclass registered by name in
`moe.launch.LAUNCHERS`. Its two halves:

- submit side, in `moe launch`: `start(opts, tasks, command, stamp)` writes the run folders and
  submits the checked tasks (or runs them here), returning the exit status of `moe launch`;
- job side, in a training process: `job_control(environ)` returns a `JobControl` when this launcher
  started the process and can restart it (Slurm: `scontrol requeue`), else None.

`JobControl` is declared where training uses it (moe/train/preemption.py: moe.train sits below
moe.launch and never imports it): `name` and `resume_later()`, called once, on rank 0, after the
checkpoint of a run stopped by the preemption warning (SIGUSR2).
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence

from moe.launch.options import LaunchOptions, Task
from moe.train.preemption import JobControl


class Launcher:
    """A way to run `moe launch`'s checked tasks; subclasses set `name` and implement `start`."""

    name = ""

    def start(self, opts: LaunchOptions, tasks: List[Task], command: Sequence[str], stamp: str) -> int:
        """Write the run folders of the checked `tasks` and submit them (or run them here); returns
        the exit status of `moe launch`. `command` is the command line to record, `stamp` the time
        stamp of this launch (the code snapshot's folder name)."""
        raise NotImplementedError

    @classmethod
    def job_control(cls, environ: Mapping[str, str]) -> Optional[JobControl]:
        """For a process with environment `environ`: its `JobControl` if this launcher started it and
        can restart it later, else None (the default: nothing restarts the run)."""
        return None
