"""Expert-parallel process groups, in DeepSpeed's layout (its legacy E + D groups, name `ep_size_{P}`).

The world of W ranks is cut into W/P expert-parallel (EP) groups of P consecutive ranks (one node when
P fits in it), which exchange tokens, and P expert-data-parallel (EDP) groups of W/P ranks with stride
P (rank r holds the same experts as r + P, r + 2P, ...), over which expert gradients are reduced.
Every rank stays a data-parallel rank for the non-expert weights. The groups are created here with
the run's `parallel.timeout_s` (DeepSpeed's own `new_group` calls would get torch's 30-minute default)
and registered in DeepSpeed's group tables (moe/parallel/deepspeed.py `register_expert_groups`).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from moe.parallel import deepspeed as ds

# torch.distributed is imported in the functions (start-up time of commands that never use it).


@dataclass
class ExpertParallelGroups:
    ep_size: int
    ep_rank: int
    ep_group: Any
    ep_ranks: List[int]
    edp_size: int
    edp_rank: int
    edp_group: Any
    edp_ranks: List[int]
    group_name: str
    timeout_s: float
    rank: int
    world_size: int


def layout(world: int, ep_size: int) -> Tuple[List[List[int]], List[List[int]]]:
    """(EDP groups, EP groups) of a world of `world` ranks, each a list of ranks, in creation order."""
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"parallel.ep_size ({ep_size}) must divide the world size ({world})")
    edp = [list(range(i, world, ep_size)) for i in range(ep_size)]
    ep = [list(range(i * ep_size, (i + 1) * ep_size)) for i in range(world // ep_size)]
    return edp, ep


def _new_groups(all_ranks: List[List[int]], rank: int, kw: Dict[str, Any]) -> Tuple[Any, List[int]]:
    """Create every group of `all_ranks` (a collective: every rank creates every group, in the same
    order) and return the one holding `rank`, with its ranks."""
    import torch.distributed as dist

    mine: Tuple[Any, List[int]] = (None, [])
    for ranks in all_ranks:
        group = dist.new_group(ranks, **kw)
        if rank in ranks:
            mine = (group, ranks)
    return mine


def create_groups(ep_size: int, timeout_s: Optional[float] = None) -> ExpertParallelGroups:
    """EP groups of consecutive ranks and strided EDP groups, created with the given timeout and
    registered in DeepSpeed's tables under `ep_size_{ep_size}` (once per process).
    A collective: every rank must call it, in the same order."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed to be initialised "
                           "(moe.parallel.init_distributed)")
    world, rank = dist.get_world_size(), dist.get_rank()
    edp_layout, ep_layout = layout(world, ep_size)
    name = f"ep_size_{ep_size}"
    if not ds.expert_groups_registered(name):
        kw = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        edp_group, edp_ranks = _new_groups(edp_layout, rank, kw)
        ep_group, ep_ranks = _new_groups(ep_layout, rank, kw)
        ds.register_expert_groups(name, ep_group, ep_ranks, edp_group, edp_ranks)
    ep_group, ep_ranks, edp_group, edp_ranks = ds.expert_groups(name)
    return ExpertParallelGroups(
        ep_size=ep_size, ep_rank=ep_ranks.index(rank), ep_group=ep_group, ep_ranks=ep_ranks,
        edp_size=len(edp_ranks), edp_rank=edp_ranks.index(rank), edp_group=edp_group, edp_ranks=edp_ranks,
        group_name=name, timeout_s=float(timeout_s or 0), rank=rank, world_size=world)
