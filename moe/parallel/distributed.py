"""Processes: the default process group, world info, and naming a failed collective.

`init_distributed`: one process needs no launcher (a world of one on a free local port); torchrun and
the deepspeed launcher set the env. Timeouts: `parallel.timeout_s` is given to the default process
group and to every group created here or in moe/parallel/groups.py (DeepSpeed's clone of the world
group, used for its gradient all-reduce, and the EP/EDP groups); torch's `new_group` would otherwise
give them its 30-minute default. A collective that fails because a peer died or stopped is named by
`collective_failure` (or raised as `CollectiveError` by the token exchange, moe/parallel/exchange.py).
"""
from __future__ import annotations

import os
import socket
import traceback
from dataclasses import dataclass
from typing import Optional

import torch

from moe.parallel import deepspeed as ds

# torch.distributed is imported in the functions: `moe` commands that never start a process group
# skip its import.


class CollectiveError(RuntimeError):
    """A collective failed or timed out because a peer rank is dead or stuck."""


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU)."""
    ds.load()  # before the torch.cuda calls below (see ds.load)
    import torch.distributed as dist

    if "RANK" not in os.environ:  # a plain `python`/`moe train` process: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        ds.init_process_group(backend, timeout_s)
    ds.preset_world_group(timeout_s)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def collective_failure(exc: BaseException, rank: int, world_size: int, timeout_s: float) -> Optional[str]:
    """A message naming this rank and the collective when `exc` came out of a torch.distributed
    collective (a peer died, or stopped answering within the timeout); None otherwise. The collective
    and its caller are read from the traceback (e.g. `all_reduce` called from
    deepspeed/runtime/engine.py:allreduce_no_retain)."""
    if isinstance(exc, CollectiveError) or exc.__traceback__ is None:
        return None  # already named (the token exchange)
    frames = traceback.extract_tb(exc.__traceback__)
    paths = [f.filename.replace(os.sep, "/") for f in frames]
    c10d = [i for i, path in enumerate(paths) if path.endswith("torch/distributed/distributed_c10d.py")]
    if not c10d:
        return None
    op = frames[c10d[0]].name
    callers = [i for i in range(c10d[0]) if "/torch/" not in paths[i] and "/deepspeed/comm/" not in paths[i]]
    where = ""
    if callers:
        where = f" called from {'/'.join(paths[callers[-1]].split('/')[-3:])}:{frames[callers[-1]].name}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"rank {rank} of {world_size}: collective {op}{where} failed (parallel.timeout_s={timeout_s:g}); a peer "
            f"rank is dead or stuck [{type(exc).__name__}: {first}]")


def shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        # ending with a barrier avoids an occasional gloo abort when one rank exits first
        dist.barrier()
        dist.destroy_process_group()
