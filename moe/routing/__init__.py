"""Routers, chosen by name (`model.moe.router`). A new router is one file plus one line in ROUTERS.

topk           token choice top-k: softmax before top-k (GShard/Switch), renormalised (= softmax after
               top-k, Mixtral) or sigmoid (DeepSeek-V3); group-limited, random routing, noise, bias
switch         token choice top-1 (Switch Transformer)
expert_choice  each expert picks its top-C tokens (Zhou et al. 2022)
sinkhorn       selection on a Sinkhorn-balanced assignment (BASE layers / Megatron)
hash           a fixed hash of the token id (Hash Layers, Roller et al. 2021)
"""
from __future__ import annotations

from typing import Dict, Type

from moe.routing.base import Router, RoutingDecision
from moe.routing.expert_choice import ExpertChoiceRouter
from moe.routing.hash import HashRouter
from moe.routing.sinkhorn import SinkhornRouter
from moe.routing.switch import SwitchRouter
from moe.routing.topk import TopKRouter

ROUTERS: Dict[str, Type[Router]] = {
    "topk": TopKRouter,
    "switch": SwitchRouter,
    "expert_choice": ExpertChoiceRouter,
    "sinkhorn": SinkhornRouter,
    "hash": HashRouter,
}


def build_router(d_model: int, cfg) -> Router:
    """cfg is a moe.config.MoEConfig."""
    try:
        cls = ROUTERS[cfg.router]
    except KeyError:
        raise ValueError(f"model.moe.router: unknown router {cfg.router!r}; known: {', '.join(sorted(ROUTERS))}") from None
    return cls(d_model, cfg)


__all__ = ["ROUTERS", "Router", "RoutingDecision", "build_router"]
