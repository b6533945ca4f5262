"""Routers, chosen by name. A new router is one file plus one line in ROUTERS."""
from __future__ import annotations

from typing import Dict, Type

from moe.routing.base import Router, RoutingDecision
from moe.routing.topk import TopKRouter

ROUTERS: Dict[str, Type[Router]] = {
    "topk": TopKRouter,
}


def build_router(d_model: int, cfg) -> Router:
    """cfg is a moe.config.MoEConfig."""
    try:
        cls = ROUTERS[cfg.router]
    except KeyError:
        raise ValueError(f"model.moe.router: unknown router {cfg.router!r}; known: {', '.join(sorted(ROUTERS))}") from None
    return cls(d_model, cfg)


__all__ = ["ROUTERS", "Router", "RoutingDecision", "build_router"]
