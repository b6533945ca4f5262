"""manifest.json: the size and SHA-256 of every file of a step folder, and of itself.

Written last into the temporary folder before it is renamed, in one canonical form, so any changed
byte of any file of the folder (the manifest included) is caught by `check_manifest`."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List

from moe.io import atomic_write, fsync_dir, fsync_file
from moe.train.checkpoint.folders import FORMAT, HASH_CHUNK, MANIFEST, VERSION


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_text(files: Dict[str, Dict[str, Any]]) -> str:
    body = {"format": FORMAT, "version": VERSION, "files": files}
    canonical = json.dumps(body, sort_keys=True, indent=1)
    body["self_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    return json.dumps(body, sort_keys=True, indent=1) + "\n"


def write_manifest(path: str) -> None:
    """Checksum every file of a finished (temporary) step folder, fsync them, write the manifest."""
    files = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name == MANIFEST or not os.path.isfile(full):
            continue
        fsync_file(full)
        files[name] = {"bytes": os.path.getsize(full), "sha256": file_sha256(full)}
    atomic_write(os.path.join(path, MANIFEST), _manifest_text(files), secrets=False)
    fsync_dir(path)


def check_manifest(path: str, version: int) -> List[str]:
    """Problems with the checksums of a step folder (format 1 has none to check)."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        return [] if version == 1 else [f"{mpath}: missing (the folder cannot be checked for corruption)"]
    try:
        raw = open(mpath, "rb").read()
        body = json.loads(raw)
        files = body["files"]
        claimed = body.pop("self_sha256")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return [f"{mpath}: unreadable ({type(exc).__name__})"]
    canonical = json.dumps(body, sort_keys=True, indent=1)
    if hashlib.sha256(canonical.encode()).hexdigest() != claimed or raw.decode() != _manifest_text(files):
        return [f"{mpath}: corrupt (its contents do not match its own checksum)"]
    problems = []
    for name, info in sorted(files.items()):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            problems.append(f"{full}: missing (listed in {MANIFEST})")
        elif os.path.getsize(full) != info["bytes"]:
            problems.append(f"{full}: {os.path.getsize(full)} bytes, {MANIFEST} says {info['bytes']}")
        elif file_sha256(full) != info["sha256"]:
            problems.append(f"{full}: corrupt (SHA-256 differs from {MANIFEST})")
    for name in sorted(set(os.listdir(path)) - set(files) - {MANIFEST}):
        problems.append(f"{os.path.join(path, name)}: not listed in {MANIFEST} (added after the save)")
    return problems
