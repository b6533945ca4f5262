"""Validation loss: the same first `train.eval_batches` micro-batches of every rank, each time."""
from __future__ import annotations

import torch
import torch.distributed as dist

from moe.config import Config
from moe.data import BatchSampler


@torch.no_grad()
def evaluate(engine, dataset, cfg: Config, dist_info, dtype) -> float:
    """Mean validation loss over the first eval_batches micro-batches of every rank (same each time)."""
    t = cfg.train
    sampler = BatchSampler(dataset, t.seq_len, t.micro_batch_size, dist_info.rank, dist_info.world_size,
                           seed=0, shuffle=False)
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for _ in range(t.eval_batches):
        x, y = sampler.next_batch()
        with torch.autocast(dist_info.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = engine(x.to(dist_info.device), y.to(dist_info.device))
        total += torch.tensor([float(out.loss), 1.0], dtype=torch.float64)
    engine.train()
    dist.all_reduce(total)
    return float(total[0] / total[1])
