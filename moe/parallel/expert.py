"""Expert parallelism (EP), applied to a built model from outside: the model file never sees it.

`apply_expert_parallel(model, ep_size)` turns every MoE layer of a replicated model into an
expert-parallel one, in three steps:

1. Process groups (moe/parallel/groups.py): EP groups of ep_size consecutive ranks, which exchange
   tokens, and strided expert-data-parallel (EDP) groups, over which expert gradients are reduced;
   created with `parallel.timeout_s` and registered in DeepSpeed's group tables.

2. Local experts (`shard_experts`): EP rank p keeps the slice [p*E/P, (p+1)*E/P) of the stacked
   weights w13 [E, 2h, d] and w2 [E, d, h]. A training model is still on `meta` here (no memory):
   moe/parallel/engine.py `materialize_model` then allocates only the slice and initialises each
   expert from a generator keyed by its global id (moe/nn/init.py), so EP=N starts from exactly the
   weights of the EP=1 model. (A model built on a device from the same seed on every rank, as tests
   build it, is sliced the same way.) The sliced parameters are
   marked as DeepSpeed expert parameters, and the layer is made recognisable to DeepSpeed's engine as
   an MoE layer (moe/parallel/deepspeed.py `mark_expert_param`, `recognise_as_moe`); without that,
   parameters marked as experts are silently never reduced.

3. The token exchange (moe/parallel/exchange.py), as forward pre/post hooks on the experts module:
   rows go to the rank holding their expert and come back, dropless, with a backward that is the
   reverse exchange.

Which routers can run expert-parallel: routing happens before the exchange, on each rank's own
micro-batch, exactly as under data parallelism, and the balancing state that needs more than one
micro-batch (aux-loss-free bias, global-batch loss) is reduced over the whole world by
moe/routing/balancing.py; so every router and balancing method of the registry runs unchanged, and
EP=N gives the model of EP=1 at the same world size and micro batch. A router whose decision needs the
tokens of other ranks would declare `supports_expert_parallel = False` (and `expert_parallel_reason`)
and `moe.validate.validate` rejects it with ep_size > 1.

Gradient scale (why EP=N is the same model as EP=1). The objective is the mean over the W ranks of
their micro-batch losses. Backward through the exchange gives expert e, on the rank that holds it,
the sum over its EP group's losses of d loss_r / d w_e. DeepSpeed's engine then all-reduces (sums)
expert gradients over the EDP group and divides by the full data-parallel world size W
(`_reduce_expert_gradients`; ZeRO 1/2's `average_tensor` does the same), giving
(1/W) sum over all W ranks of d loss_r / d w_e: the gradient of the objective, exactly as at EP=1.
Averaging over the EDP group only (W/P) would make expert gradients P times too large; the test-only
switch MOE_TEST_EXPERT_GRAD_SCALE (moe/parallel/faults.py) reproduces that class of bug so the parity
harness can show it catches it. The gradient norm and clipping, every expert counted once:
moe/parallel/clipping.py.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from moe.nn.moe_layer import MoELayer
from moe.parallel import deepspeed as ds
from moe.parallel.exchange import TokenExchange
from moe.parallel.groups import ExpertParallelGroups, create_groups

# torch.distributed is imported in the functions (start-up time of commands that never use it).

EXPERT_PARAM_NAMES = ("w13", "w2")


def moe_layers(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def expert_layout(experts: nn.Module) -> tuple:
    """(first global expert id, local experts, global experts) of an Experts module."""
    local = experts.w13.shape[0]
    return getattr(experts, "ep_offset", 0), local, getattr(experts, "ep_global_experts", local)


def shard_experts(experts: nn.Module, groups: ExpertParallelGroups) -> None:
    """Keep this EP rank's slice of the stacked expert weights and mark them as expert parameters."""
    E = experts.w13.shape[0]
    L = E // groups.ep_size
    start = groups.ep_rank * L
    for name in EXPERT_PARAM_NAMES:
        full = getattr(experts, name)
        local = nn.Parameter(full.detach()[start:start + L].clone(), requires_grad=full.requires_grad)
        ds.mark_expert_param(local, groups.group_name)
        setattr(experts, name, local)
    experts.num_experts = L
    experts.ep_offset = start
    experts.ep_global_experts = E


def check_supported(model: nn.Module, ep_size: int) -> None:
    """Raise ValueError for MoE layers that cannot be split over ep_size ranks."""
    for layer in moe_layers(model):
        E = layer.num_experts
        if E % ep_size:
            raise ValueError(f"parallel.ep_size ({ep_size}) must divide model.moe.num_experts ({E})")
        if not getattr(layer.router, "supports_expert_parallel", True):
            raise ValueError(f"model.moe.router={layer.cfg.router} cannot run expert-parallel "
                             f"(parallel.ep_size={ep_size}): {getattr(layer.router, 'expert_parallel_reason', '')}")


def apply_expert_parallel(model: nn.Module, ep_size: int, timeout_s: Optional[float] = None
                          ) -> Optional[ExpertParallelGroups]:
    """Shard every MoE layer's experts over EP groups of ep_size ranks (see the module docstring).
    Call after the model is built (same seed on every rank) and before the optimizer and the
    DeepSpeed engine. ep_size=1 changes nothing and returns None."""
    layers = moe_layers(model)
    if ep_size <= 1 or not layers:
        return None
    check_supported(model, ep_size)
    groups = create_groups(ep_size, timeout_s)
    names = {id(m): n for n, m in model.named_modules()}
    for layer in layers:
        shard_experts(layer.experts, groups)
        exchange = TokenExchange(groups, layer.num_experts, names.get(id(layer), "an MoE layer"))
        exchange.attach(layer.experts)
        layer.experts.token_exchange = exchange
        ds.recognise_as_moe(layer)
    return groups


def model_groups(model: nn.Module) -> Optional[ExpertParallelGroups]:
    """The expert-parallel groups the model's experts were sharded over; None without EP."""
    for layer in moe_layers(model):
        ex = getattr(layer.experts, "token_exchange", None)
        if ex is not None:
            return ex.groups
    return None


def gather_experts(tensor: torch.Tensor, groups: Optional[ExpertParallelGroups]) -> torch.Tensor:
    """The full [E, ...] tensor from each EP rank's [E/P, ...] slice (a collective over the EP group)."""
    import torch.distributed as dist

    if groups is None or groups.ep_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(groups.ep_size)]
    dist.all_gather(parts, tensor.contiguous(), group=groups.ep_group)
    return torch.cat(parts, dim=0)
