"""Expert-parallel telemetry: what the token exchanges of moe/parallel/exchange.py accumulated (their
wall time, training only, including waiting for the slowest peer; the rows each rank's experts
computed), reduced at a logging step and reset."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from moe.parallel.exchange import TokenExchange
from moe.parallel.expert import moe_layers

# torch.distributed is imported in the functions (start-up time of commands that never use it).


def exchanges(model: nn.Module) -> List[TokenExchange]:
    return [layer.experts.token_exchange for layer in moe_layers(model)
            if getattr(layer.experts, "token_exchange", None) is not None]


def ep_metrics(model: nn.Module, steps: int, window_s: float) -> Dict[str, float]:
    """Exchange time and token imbalance since the last call, over `steps` optimizer steps lasting
    `window_s` seconds. A collective (two all-reduces over the world) when EP is on: call on every
    rank. Keys: `ep/exchange_s` (exchange seconds per step, slowest rank), `ep/exchange_share`
    (of the window's wall time), `ep/rank_token_imbalance` (max / mean expert rows per rank; 1 is
    perfect balance), `ep/rows_per_rank_max`."""
    import torch.distributed as dist

    ex = exchanges(model)
    if not ex:
        return {}
    seconds = sum(e.exchange_s for e in ex)
    rows = float(sum(e.rows for e in ex))
    for e in ex:
        e.exchange_s, e.rows = 0.0, 0
    mx = torch.tensor([seconds, rows], dtype=torch.float64)
    sm = torch.tensor([rows], dtype=torch.float64)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    dist.all_reduce(sm)
    mean_rows = float(sm) / dist.get_world_size()
    steps = max(steps, 1)
    return {"ep/exchange_s": float(mx[0]) / steps,
            "ep/exchange_share": float(mx[0]) / window_s if window_s > 0 else 0.0,
            "ep/rank_token_imbalance": float(mx[1]) / mean_rows if mean_rows > 0 else 1.0,
            "ep/rows_per_rank_max": float(mx[1]) / steps}
