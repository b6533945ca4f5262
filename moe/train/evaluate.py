"""Validation loss: the same first `train.eval_batches` micro-batches of every rank, each time; per source
of a data mixture (`evaluate_sources`)."""
from __future__ import annotations

from typing import Dict, Tuple

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


def evaluate_sources(engine, data, cfg: Config, dist_info, dtype) -> Tuple[float, Dict[str, float]]:
    """(validation loss, {`loss/val/<source>`: loss}): a mixture's loss is the weighted mean of its
    sources' (data.sources weights, normalised), each evaluated like a single dataset."""
    if not data.sources:
        return evaluate(engine, data.val, cfg, dist_info, dtype), {}
    per_source = {f"loss/val/{src.name}": evaluate(engine, src.val, cfg, dist_info, dtype) for src in data.sources}
    overall = sum(src.weight * per_source[f"loss/val/{src.name}"] for src in data.sources)
    return overall, per_source
