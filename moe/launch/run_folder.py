"""What every launcher writes into the run folders of checked tasks, besides its own script: the
resolved config (through the trainer's own `prepare_run_dir`) and the history of launches of the
folder (`launch.json`); and `write`, through which every file of a launch is written. The code
snapshot is moe/launch/snapshot.py."""
from __future__ import annotations

import json
import os
from typing import List

from moe.io import atomic_write
from moe.launch.options import Task
from moe.train.run_dir import prepare_run_dir


def write(path: str, text: str, mode: int = 0o644) -> None:
    """Every file `moe launch` writes goes through here: redacted, then atomically replaced."""
    atomic_write(path, text, mode=mode)


def prepare_run_dirs(tasks: List[Task]) -> None:
    """Create each run folder and write its resolved config through the trainer's own check."""
    for t in tasks:
        prepare_run_dir(t.cfg, is_writer=True)


def record_launch(job_dir: str, entry: dict) -> None:
    """Append `entry` to the launches in `job_dir/launch.json` (an unreadable file starts over)."""
    path = os.path.join(job_dir, "launch.json")
    history = []
    if os.path.isfile(path):
        try:
            history = json.load(open(path)).get("launches", [])
        except (ValueError, AttributeError):
            history = []
    history.append(entry)
    write(path, json.dumps({"launches": history}, indent=2) + "\n")
