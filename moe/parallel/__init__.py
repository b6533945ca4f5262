"""Distributed setup, applied to the model from outside: process groups and the DeepSpeed engine.

The model never calls into DeepSpeed; everything that makes it distributed happens here:
`init_distributed` (one process needs no launcher; torchrun and the deepspeed launcher set the env),
`build_engine`, which applies, in order: expert parallelism (`moe.parallel.expert.apply_expert_parallel`
when parallel.ep_size > 1: expert-parallel groups, local expert slices, the token exchange, the
DeepSpeed MoE adapter), AdamW with weight-decay groups split into DeepSpeed's MoE parameter groups,
the LR schedule, `deepspeed.initialize` (ZeRO, clipping, accumulation, precision), and the EP fix of
DeepSpeed's non-ZeRO gradient clipping.

Timeouts: `parallel.timeout_s` is given to the default process group, and to every group created
here (DeepSpeed's clone of the world group, used for its gradient all-reduce, and the EP/EDP
groups); torch's `new_group` would otherwise give them its 30-minute default.
"""
from __future__ import annotations

import datetime
import math
import os
import socket
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch


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
    import deepspeed
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
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    _clone_world_group(timeout_s)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def _clone_world_group(timeout_s: int) -> None:
    """DeepSpeed reduces gradients over its own clone of the world group (groups._clone_world_group),
    created without a timeout; create it first, with ours, so a dead or stuck rank ends the
    all-reduce within timeout_s instead of 30 minutes."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    if groups._WORLD_GROUP is None:
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())),
                                             timeout=datetime.timedelta(seconds=timeout_s))


def collective_failure(exc: BaseException, rank: int, world_size: int, timeout_s: float) -> Optional[str]:
    """A message naming this rank and the collective when `exc` came out of a torch.distributed
    collective (a peer died, or stopped answering within the timeout); None otherwise. The collective
    and its caller are read from the traceback (e.g. `all_reduce` called from
    deepspeed/runtime/engine.py:allreduce_no_retain)."""
    import traceback

    from moe.parallel.expert import CollectiveError

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


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Weight decay on matrices only (not norms, embeddings, the tied head), then DeepSpeed's MoE split.

    `split_params_into_different_moe_groups_for_optimizer` moves expert parameters (those marked
    `allreduce=False` by expert parallelism) into groups of their own so the engine reduces them over
    the expert-data-parallel group; with ep_size=1 no parameter is marked and it changes nothing.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    embed = {id(p) for n, p in model.named_parameters() if n.endswith("embed.weight")}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embed else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return split_params_into_different_moe_groups_for_optimizer([g for g in groups if g["params"]])


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


def build_engine(model: torch.nn.Module, cfg, dist_info: DistInfo, grad_accum: int):
    """Wrap the model in a DeepSpeed engine with a torch AdamW and a warmup+cosine schedule, after
    sharding its experts when parallel.ep_size > 1 (the model must be built with the same seed on
    every rank: each EP rank keeps its slice of the identically initialised experts)."""
    import deepspeed

    from moe.parallel import expert as expert_parallel

    t = cfg.train
    expert_parallel.apply_expert_parallel(model, cfg.parallel.ep_size, cfg.parallel.timeout_s)
    if t.compile:
        apply_compile(model)
    dtype = resolve_dtype(t.dtype, dist_info.device)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, t.weight_decay), lr=t.lr,
                                  betas=(t.beta1, t.beta2), eps=t.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, t.warmup_steps, t.steps, t.min_lr_ratio))
    ds_config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10 ** 12,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if expert_parallel.model_groups(model) is not None:
        if not engine.has_moe_layers:
            raise RuntimeError("DeepSpeed did not recognise the expert-parallel MoE layers; expert gradients "
                               "would not be reduced")
        expert_parallel.fix_engine_clipping(engine)
    return engine, optimizer, scheduler, dtype


def grad_norm(engine) -> float:
    """Global gradient norm before clipping, every expert counted once (a collective under EP).
    Without ZeRO, call it at the accumulation boundary after backward and before engine.step (the
    engine has reduced the gradients then); ZeRO 1/2 keep them partitioned and report the norm after
    their step (`engine.get_global_grad_norm()`)."""
    from moe.parallel.expert import global_grad_norm

    if engine.zero_optimization_stage() > 0:
        norm = engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")
    return float(global_grad_norm(list(engine.module.parameters())))
