"""Step-level balancing: what happens after each optimizer step.

Two balancing methods need the expert load of a whole optimizer step (every micro-batch of the
gradient-accumulation window, on every data-parallel rank):
- auxiliary-loss-free balancing (Wang et al. 2024): the selection bias moves by
  bias_update_rate * sign(mean load - load) per step;
- the global-batch balancing loss (Qiu et al. 2025): the step's load fraction becomes the f of the
  next step's loss.
Each router with either method on counts the experts it chose during the step (`Router.step_load`).
`end_optimizer_step` sums those counts over data-parallel ranks in one all-reduce (all layers
stacked) and hands the result to every router, so biases and f are identical on every rank and do not
depend on how the global batch was cut into micro-batches.

The training loop calls it once after each optimizer step (at the accumulation boundary).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe.routing.base import Router


def step_tracking_routers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, Router) and m.step_load is not None]


@torch.no_grad()
def end_optimizer_step(model: nn.Module) -> None:
    """Update balancing biases and global-loss statistics from the step's load. A collective when
    torch.distributed is initialised with more than one rank: call it on every rank."""
    routers = step_tracking_routers(model)
    if not routers:
        return
    loads = torch.stack([r.step_load for r in routers]).to(torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(loads)
    for router, load in zip(routers, loads):
        router.end_step(load)
