"""The gradient norm and clipping under expert parallelism: every expert counted once.

Each expert's gradient lives on the ranks of one EP position, so the global norm is
sqrt(|g_nonexpert|^2 + sum over the EP group of |g_local_experts|^2). ZeRO 1/2 get this right (the
squared partition norms are summed over the whole world, where every (expert, partition) is held by
exactly one rank). Without ZeRO, DeepSpeed 0.19 gets it wrong under EP: fp32 averages the per-rank
norms (`runtime/utils.clip_grad_norm_`) and bf16 leaves expert gradients out of the norm altogether
(`FP16_UnfusedOptimizer.step`). `fix_engine_clipping` replaces both with the clipping below (through
moe/parallel/deepspeed.py); `global_grad_norm` is the norm the loop logs. Every ZeRO-0 engine gets it,
with or without experts: without EP it is DeepSpeed's rule and norm, and the engine's step then reuses
the norm the loop read (no second pass over the gradients, none to multiply by a coefficient of 1).
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence

import torch

from moe.parallel import deepspeed as ds

# torch.distributed is imported in the functions (start-up time of commands that never use it).


@torch.no_grad()
def global_grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of the full model's gradient, every expert counted once. Call on every rank after the
    gradients were reduced (non-expert ones over data parallel, expert ones over EDP) and before they
    are clipped; a collective over the EP groups when there are expert parameters."""
    import torch.distributed as dist

    params = list(params)
    is_expert = ds.is_expert_param
    dense = [p.grad.detach() for p in params if p.grad is not None and not is_expert(p)]
    total = _sum_of_squares(dense) if dense else torch.zeros(())
    by_group: Dict[str, List[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None and is_expert(p):
            by_group.setdefault(p.group_name, []).append(p.grad.detach())
    for name in sorted(by_group):
        sq = _sum_of_squares(by_group[name]).to(total.device)
        dist.all_reduce(sq, group=ds.expert_parallel_group(name))
        total = total + sq.to(total.device)
    return total.sqrt()


def _sum_of_squares(tensors: List[torch.Tensor]) -> torch.Tensor:
    """Sum of the tensors' squared L2 norms, each norm in fp32 (one foreach call: a fused kernel on
    GPU, one dispatch instead of one per tensor on CPU)."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).square().sum()


_NORM_BEFORE_STEP: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
"""engine -> the global gradient norm read at the accumulation boundary just before its step
(moe/parallel/engine.py `grad_norm`): the engine's clipping takes it instead of computing it again."""


def remember_norm_before_step(engine, norm: torch.Tensor) -> None:
    """The norm of the gradients `engine.step()` will clip, read by the training step on every rank at
    the same boundary; the clipping installed by `fix_engine_clipping` uses it once (a second pass
    over every gradient saved; every rank skips the same collective)."""
    _NORM_BEFORE_STEP[engine] = norm


@torch.no_grad()
def clip_grad_norm_(params: Sequence[torch.Tensor], max_norm: float,
                    norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DeepSpeed's clipping rule (coefficient min(1, max_norm / (norm + 1e-6))) on the EP-correct norm
    (`norm`: that of these gradients, already computed)."""
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params) if norm is None else norm
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        # x 1.0 changes nothing: on CPU (reading coef costs no device sync) skip that pass over every
        # gradient, which an MoE's many expert weights make several ms per step
        if coef.device.type != "cpu" or float(coef) < 1.0:
            for p in params:
                p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
    return norm


def fix_engine_clipping(engine) -> None:
    """Without ZeRO, DeepSpeed's clipping is wrong under EP (see the module docstring): route it
    through the EP-correct norm. ZeRO 1/2 compute the norm correctly and are left alone."""
    if engine.zero_optimization_stage() > 0 or engine.gradient_clipping() <= 0:
        return
    max_norm = engine.gradient_clipping()
    if ds.wraps_low_precision(engine.optimizer):
        # bf16/fp16 wrapper: clip the low-precision gradients here and let it copy them to fp32 unclipped
        def clip_scaled(params: List[torch.Tensor], loss_scale: float) -> torch.Tensor:
            norm = global_grad_norm(params) / loss_scale
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.dtype))
            return norm

        ds.replace_low_precision_clipping(engine.optimizer, clip_scaled)
        return
    ds.replace_fp32_clipping(engine, lambda: clip_grad_norm_(list(engine.module.parameters()), max_norm,
                                                             norm=_NORM_BEFORE_STEP.pop(engine, None)))
