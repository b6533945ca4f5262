"""The DeepSpeed engine, and what is applied to the model before it.

`build_engine` applies, in order: expert parallelism (moe/parallel/expert.py `apply_expert_parallel`,
when parallel.ep_size > 1: groups, local expert slices, the token exchange, DeepSpeed's view of the
MoE layers), the materialisation of a model built on `meta` (`materialize_model`: this rank's
weights only, initialised layout-free or loaded), activation recompute (moe/parallel/recompute.py `apply_recompute`, when train.recompute
is not none), torch.compile of the blocks (`apply_compile`, when train.compile), AdamW with
weight-decay groups split into DeepSpeed's MoE parameter groups, the warmup + cosine LR schedule, the
DeepSpeed engine (ZeRO, clipping, accumulation, precision; moe/parallel/deepspeed.py `initialize`),
and under EP the fix of DeepSpeed's non-ZeRO gradient clipping (moe/parallel/clipping.py).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

import torch

from moe.nn.init import has_meta, init_weights, materialize
from moe.parallel import deepspeed as ds
from moe.parallel import faults
from moe.parallel.clipping import fix_engine_clipping, global_grad_norm, remember_norm_before_step
from moe.parallel.distributed import DistInfo
from moe.parallel.expert import EXPERT_PARAM_NAMES, apply_expert_parallel, model_groups, moe_layers
from moe.parallel.recompute import apply_recompute


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Weight decay on matrices only (not norms, embeddings, the tied head), then DeepSpeed's MoE split
    (`ds.split_moe_param_groups`: expert parameters, those marked by expert parallelism, go into groups
    of their own, reduced over the expert-data-parallel group; with ep_size=1 it changes nothing)."""
    decay, no_decay = [], []
    embed = {id(p) for n, p in model.named_parameters() if n.endswith("embed.weight")}
    for _name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embed else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return ds.split_moe_param_groups([g for g in groups if g["params"]])


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, cosine decay to min_ratio at `total` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def apply_compile(model: torch.nn.Module) -> None:
    """torch.compile each transformer block in place (`nn.Module.compile`: parameter names, state dicts
    and DeepSpeed's parameter groups are unchanged). Blocks of one kind share their compiled code, so
    depth does not add compile time; a dense and an MoE block each compile once per mode (training,
    evaluation). An MoE layer compiles whole, router statistics included, with the extension's ops or
    `grouped` experts; an expert-parallel token exchange runs eagerly between the compiled parts."""
    for block in model.blocks:
        block.compile()


def deepspeed_config(train, grad_accum: int, dtype: torch.dtype) -> Dict[str, Any]:
    """The DeepSpeed config of a run's `train` section."""
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10 ** 12,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def materialize_model(model: torch.nn.Module, device: torch.device, seed: int,
                      load_weights: Optional[Callable[[torch.nn.Module], None]] = None) -> None:
    """A model built on `meta` (moe/train/build.py), its experts already sliced to this rank's: allocate
    on `device` what the rank holds, then fill it: `load_weights(model)` when given (the hook for
    loading weights instead of initialising them), else the layout-free seeded init
    (moe/nn/init.py). A model already materialised is left as it is."""
    if not has_meta(model):
        return
    materialize(model, device)
    if load_weights is not None:
        load_weights(model)
    else:
        init_weights(model, seed)


def build_engine(model: torch.nn.Module, cfg, dist_info: DistInfo, grad_accum: int,
                 load_weights: Optional[Callable[[torch.nn.Module], None]] = None):
    """Wrap the model in a DeepSpeed engine with a torch AdamW and a warmup+cosine schedule, after
    sharding its experts when parallel.ep_size > 1 and materialising a model built on `meta`
    (`materialize_model`: each rank allocates and initialises only its own experts). A model built on
    a real device must be built with the same seed on every rank (each EP rank keeps its slice of the
    identically initialised experts)."""
    t = cfg.train
    groups = apply_expert_parallel(model, cfg.parallel.ep_size, cfg.parallel.timeout_s)
    materialize_model(model, dist_info.device, cfg.run.seed, load_weights)
    if groups is not None:  # test-only; after materialising (hooks live on the Parameter objects)
        faults.scale_expert_gradients([m.experts for m in moe_layers(model)], EXPERT_PARAM_NAMES)
    if t.recompute != "none":
        apply_recompute(model, t.recompute, compile_blocks=t.compile)
    elif t.compile:
        apply_compile(model)
    dtype = resolve_dtype(t.dtype, dist_info.device)
    # fused: one pass over each tensor's weights, gradient and moments, no sqrt(v) temporaries (on the
    # CPU 4x faster than the default per-tensor loop, which counts for fine-grained MoEs: many parameters
    # for their active compute); torch has the fused kernel on both device types
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, t.weight_decay), lr=t.lr,
                                  betas=(t.beta1, t.beta2), eps=t.eps,
                                  fused=True if dist_info.device.type in ("cpu", "cuda") else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, t.warmup_steps, t.steps, t.min_lr_ratio))
    engine, optimizer, scheduler = ds.initialize(model, optimizer, scheduler, deepspeed_config(t, grad_accum, dtype))
    ds.skip_allreduce_of_one_process(engine)
    if model_groups(model) is not None and not ds.has_moe_layers(engine):
        raise RuntimeError("DeepSpeed did not recognise the expert-parallel MoE layers; expert gradients "
                           "would not be reduced")
    # every ZeRO-0 engine, not only expert-parallel ones: the same rule, and the norm the step logs is
    # reused rather than computed again (moe/parallel/clipping.py)
    fix_engine_clipping(engine)
    return engine, optimizer, scheduler, dtype


def grad_norm(engine) -> float:
    """Global gradient norm before clipping, every expert counted once (a collective under EP).
    Without ZeRO, call it at the accumulation boundary after backward and before engine.step (the
    engine has reduced the gradients then); ZeRO 1/2 keep them partitioned and report the norm after
    their step (`engine.get_global_grad_norm()`)."""
    if engine.zero_optimization_stage() > 0:
        norm = engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")
    norm = global_grad_norm(list(engine.module.parameters()))
    remember_norm_before_step(engine, norm)  # its clipping (fix_engine_clipping) reuses it
    return float(norm)
