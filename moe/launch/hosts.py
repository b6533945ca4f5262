"""DeepSpeed hostfiles: `python -m moe.launch world-info HOSTFILE` is the helper the job script uses
with the deepspeed launcher (its stdout is captured: it prints the --world_info value only)."""
from __future__ import annotations

import base64
import json
import re
import sys
from typing import Dict, List, Optional

from moe.launch.errors import LaunchError


def read_hostfile(path: str) -> Dict[str, int]:
    """{host: slots} from a DeepSpeed hostfile (`host slots=N` per line, # comments), in file order."""
    hosts: Dict[str, int] = {}
    for n, line in enumerate(open(path), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not m or m.group(1) in hosts or int(m.group(2)) < 1:
            raise LaunchError(f"{path}:{n}: expected a new `host slots=N` line, got {line!r}")
        hosts[m.group(1)] = int(m.group(2))
    if not hosts:
        raise LaunchError(f"{path}: no hosts")
    return hosts


def world_info(hostfile: str) -> str:
    """deepspeed.launcher.launch's --world_info (urlsafe base64 of {host: [slot ids]}) for a hostfile.
    Pure Python on purpose: importing deepspeed prints to stdout, and the job script captures this."""
    info = {host: list(range(slots)) for host, slots in read_hostfile(hostfile).items()}
    return base64.urlsafe_b64encode(json.dumps(info).encode()).decode()


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "world-info":
        print(world_info(argv[1]))
        return
    print("usage: python -m moe.launch world-info HOSTFILE   (for `moe launch`, see `moe launch --help`)",
          file=sys.stderr)
    sys.exit(2)
