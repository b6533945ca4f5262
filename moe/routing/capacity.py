"""Per-expert capacity of an MoE layer, for the current mode (train or eval).

capacity = max(min_capacity, ceil(factor * tokens * top_k / num_experts)) with factor the training
or eval capacity factor; None (dropless) when the factor is 0. An expert over capacity keeps its
pairs of highest priority (drop_policy probs: gate weight; position: earliest token) and drops the
rest; a dropped pair contributes nothing, so a token with no kept expert rides the residual path.
Capacity-based routers (expert choice) always get a capacity: eval_capacity_factor 0 falls back to
capacity_factor.
"""
from __future__ import annotations

from typing import Optional

from moe import ops


def layer_capacity(cfg, num_tokens: int, training: bool, capacity_based: bool = False) -> Optional[int]:
    """cfg is a moe.config.MoEConfig."""
    factor = cfg.capacity_factor if training else cfg.eval_capacity_factor
    if capacity_based and factor <= 0:
        factor = cfg.capacity_factor
    return ops.expert_capacity(num_tokens, cfg.top_k, cfg.num_experts, factor, cfg.min_capacity)
