"""The folders of `checkpoints/`: step folder names, the `latest` pointer, pruning and the leftovers
of killed saves, and the names of the files a step folder holds (the package docstring describes them)."""
from __future__ import annotations

import os
import re
import shutil
from typing import List, Optional, Tuple

from moe.errors import CheckpointError
from moe.io import atomic_write

STEP_DIR = re.compile(r"^step_(\d{8})$")
FORMAT = "moe-layout-free"
VERSION = 2
"""2: trainer.json and manifest.json (checksums). 1: trainer.pt (pickle, read with weights_only)."""
READABLE_VERSIONS = (1, 2)
LEGACY_MODEL_FILE = "mp_rank_00_model_states.pt"
MANIFEST = "manifest.json"
TRAINER = "trainer.json"
TRAINER_V1 = "trainer.pt"
HASH_CHUNK = 8 << 20


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def list_steps(ckpt_dir: str) -> List[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(m.group(1)) for m in map(STEP_DIR.match, os.listdir(ckpt_dir))
                  if m and os.path.isdir(os.path.join(ckpt_dir, m.group(0))))


def read_latest(ckpt_dir: str) -> Tuple[Optional[str], Optional[str]]:
    """(tag, None) when `latest` names a step folder that exists; (None, why) when it is missing,
    unreadable or dangling."""
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None, f"{path} is missing"
    try:
        tag = open(path).read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{path} is unreadable ({exc})"
    if not STEP_DIR.match(tag) or not os.path.isdir(os.path.join(ckpt_dir, tag)):
        return None, f"{path} points to {tag[:40]!r}, which is not a step folder here"
    return tag, None


def latest_tag(ckpt_dir: str) -> Optional[str]:
    """The tag `latest` names; None when there is no checkpoint at all. A missing or dangling
    `latest` beside step folders raises (use `find_resume` to fall back)."""
    tag, why = read_latest(ckpt_dir)
    if tag is None and (list_steps(ckpt_dir) or os.path.isfile(os.path.join(ckpt_dir, "latest"))):
        raise CheckpointError(f"{why}; the newest complete step folder can be resumed from "
                              f"(moe train does so by itself)" if list_steps(ckpt_dir) else
                              f"{why}, and there is no step folder: the checkpoints are gone")
    return tag


def problems_brief(problems: List[str], n: int = 6) -> str:
    return "; ".join(problems[:n]) + (f" ... ({len(problems)} problems)" if len(problems) > n else "")


def prune(ckpt_dir: str, just_written: int, keep_last: int) -> List[str]:
    """Delete step folders older than the one just written, keeping it and the keep_last - 1 before
    it. A folder newer than the one just written is never deleted (it belongs to a longer run of
    this folder; moe train refuses to start over such a run)."""
    older = [s for s in list_steps(ckpt_dir) if s < just_written]
    doomed = older[:max(0, len(older) - (keep_last - 1))]
    for step in doomed:
        shutil.rmtree(os.path.join(ckpt_dir, step_tag(step)), ignore_errors=True)
    return [step_tag(s) for s in doomed]


def remove_leftovers(ckpt_dir: str) -> List[str]:
    """Temporary folders and pointer files of saves that were killed. Call only while holding the
    run-folder lock (no other process can be saving here)."""
    if not os.path.isdir(ckpt_dir):
        return []
    gone = []
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if name.startswith(".tmp-step_") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            gone.append(name)
        elif name == "latest.tmp":
            os.unlink(path)
            gone.append(name)
    return gone


def write_latest(ckpt_dir: str, tag: str) -> None:
    atomic_write(os.path.join(ckpt_dir, "latest"), tag, secrets=False)
