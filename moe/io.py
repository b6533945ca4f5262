"""Writing files that must never be seen half-written, and keeping secrets out of them.

`atomic_write` writes to a temporary name beside the target, fsyncs it, renames it over the target
and fsyncs the folder, so after a crash (or a power loss) the target holds either the old or the new
contents. `redact` replaces the values of environment variables named like a secret. `RunFolder`
names the files of a run folder, the one place their names are spelled.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

from moe.errors import RunFolderBusy

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|PRIVATE", re.IGNORECASE)
REDACTED = "<redacted>"


def secret_values(env: Optional[Dict[str, str]] = None) -> List[str]:
    """Values of environment variables named like a secret (long enough not to be a common word),
    longest first so that a secret containing another is redacted whole."""
    env = os.environ if env is None else env
    return sorted({v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= 6}, key=len, reverse=True)


def redact(text: str, env: Optional[Dict[str, str]] = None) -> str:
    for value in secret_values(env):
        text = text.replace(value, REDACTED)
    return text


def fsync_dir(path: str) -> None:
    """Make a rename or a new file inside `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: Union[str, bytes], mode: Optional[int] = None, secrets: bool = True) -> None:
    """Replace `path` with `data` atomically and durably. Text is redacted of secret values unless
    `secrets=False`. A failed write (disk full) leaves the old file and removes the temporary one."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    if isinstance(data, str):
        data = (redact(data) if secrets else data).encode()
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True)
class RunFolder:
    """The files of one run folder, `<run.root>/<run.name>/`. Their names are part of the on-disk
    format (`moe compare`, `moe report`, resuming and the launcher read them), spelled only here."""

    path: str

    @classmethod
    def of(cls, run_root: str, name: str) -> "RunFolder":
        return cls(os.path.join(run_root, name))

    @property
    def config(self) -> str:
        """config.yaml: the resolved config the run trains with (secrets redacted)."""
        return os.path.join(self.path, CONFIG_FILE)

    @property
    def metrics(self) -> str:
        """metrics.jsonl: one JSON record per logged step or evaluation."""
        return os.path.join(self.path, METRICS_FILE)

    @property
    def summary(self) -> str:
        """summary.json: status (running, finished, preempted, failed), sizes and final losses."""
        return os.path.join(self.path, SUMMARY_FILE)

    @property
    def checkpoints(self) -> str:
        """checkpoints/: one folder per saved step and the `latest` pointer."""
        return os.path.join(self.path, CHECKPOINTS_DIR)


class RunLock:
    """An OS-level lock on one run folder, so one process tree at a time trains in it. The kernel
    releases it when the holder dies (flock), so a killed run never leaves a stale lock. The lock file
    sits beside the run folder (`<root>/.<name>.lock`), not in it, because `run.overwrite` moves the
    folder aside and a lock inside it would move with it. It holds who has it (host, pid, since)."""

    def __init__(self, run_root: str, name: str) -> None:
        self.run_dir = os.path.join(run_root, name)
        self.path = os.path.join(run_root, f".{name}.lock")
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            try:
                h = json.loads(holder)
                who = f"pid {h['pid']} on {h['host']} since {h['since']}"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise RunFolderBusy(f"{self.run_dir} is in use: {who} trains there (lock {self.path}); wait for it to end, "
                                f"stop it, or choose another run.name") from None
        os.ftruncate(fd, 0)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None
