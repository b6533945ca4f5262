"""Distributed setup, applied to the model from outside: process groups and the DeepSpeed engine.

The model never calls into DeepSpeed; everything that makes it distributed happens here:
`init_distributed` (one process needs no launcher; torchrun and the deepspeed launcher set the env),
`build_engine` (AdamW with weight-decay groups split into DeepSpeed's MoE parameter groups, the LR
schedule, ZeRO, clipping, accumulation, precision) and the checkpoint helpers.
"""
from __future__ import annotations

import datetime
import math
import os
import socket
from dataclasses import dataclass
from typing import Any, Dict, List

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
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


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


def build_engine(model: torch.nn.Module, cfg, dist_info: DistInfo, grad_accum: int):
    """Wrap the model in a DeepSpeed engine with a torch AdamW and a warmup+cosine schedule."""
    import deepspeed

    t = cfg.train
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
    return engine, optimizer, scheduler, dtype
