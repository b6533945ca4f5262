"""Routers, chosen by name (`model.moe.router`). A new router is one file plus one line in ROUTERS.

topk           token choice top-k: softmax before top-k (GShard/Switch), renormalised (= softmax after
               top-k, Mixtral) or sigmoid (DeepSeek-V3); group-limited, random routing, noise, bias
switch         token choice top-1 (Switch Transformer)
expert_choice  each expert picks its top-C tokens (Zhou et al. 2022)
sinkhorn       selection on a Sinkhorn-balanced assignment (BASE layers / Megatron)
hash           a fixed hash of the token id (Hash Layers, Roller et al. 2021)

`check_config` checks a config's routing knobs (moe.validate calls it): each family checks its own
in `validate_config`.

Where the routers follow megatron-core (tests/unit/routing compare against its functions): softmax
before top-k, softmax after top-k, sigmoid scores renormalised over the chosen k, the aux-loss-free
bias used for selection only, group-limited top-k, the routed scaling factor on the gate weights
(`model.moe.routed_scaling_factor`), and the balancing losses counting the unbiased top-k of the
scores (`Router.balance_indices`). Where they differ, on purpose:

- the score normalisers' floor is fp32's smallest normal number, not 1e-20, so a sigmoid router
  cannot push every score below the floor and the balancing loss towards 0 (megatron-core #1545);
- sinkhorn: the gate weights are `score_func` of the logits (renormalised as in topk); megatron-core
  uses sigmoid(logit) at top-1 and the unrenormalised softmax at top-k > 1, and refuses an aux loss;
- group-limited routing with softmax + renormalize: a group's score sums the softmax scores of its
  best experts; megatron-core's post-softmax path sums raw logits there. The two rules can rank groups
  differently (a sum of probabilities is not monotone in a sum of logits); we keep one rule, on the
  scores, for every score function.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Type

from moe.errors import ConfigError
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

if TYPE_CHECKING:  # annotations only
    from moe.config import ModelConfig, MoEConfig, ParallelConfig


def build_router(d_model: int, cfg) -> Router:
    """cfg is a moe.config.MoEConfig."""
    try:
        cls = ROUTERS[cfg.router]
    except KeyError:
        raise ValueError(f"model.moe.router: unknown router {cfg.router!r}; known: {', '.join(sorted(ROUTERS))}") from None
    return cls(d_model, cfg)


def check_router_name(moe_cfg: MoEConfig) -> None:
    """ConfigError unless `model.moe.router` names a router of ROUTERS (nothing to check without experts)."""
    if moe_cfg.num_experts > 0 and moe_cfg.router not in ROUTERS:
        raise ConfigError(f"model.moe.router: unknown router {moe_cfg.router!r}; known: {', '.join(sorted(ROUTERS))}")


def check_config(model_cfg: ModelConfig, parallel_cfg: ParallelConfig) -> None:
    """The routing knobs of a config, for moe.validate: a known router, the router family's own
    `validate_config`, experts that split evenly over the expert-parallel ranks, and a router that can
    run expert-parallel when parallel.ep_size > 1. A dense model (no experts) has nothing to check.
    Raises a one-line ConfigError naming the keys."""
    moe = model_cfg.moe
    if moe.num_experts == 0:
        return
    check_router_name(moe)
    router_cls = ROUTERS[moe.router]
    router_cls.validate_config(moe)
    check_expert_parallel(moe, parallel_cfg, router_cls)


def check_expert_parallel(moe_cfg: MoEConfig, parallel_cfg: ParallelConfig, router_cls: Type[Router]) -> None:
    """parallel.ep_size divides the experts, and the router does not need the tokens of other ranks."""
    ep_size = parallel_cfg.ep_size
    if moe_cfg.num_experts % ep_size:
        raise ConfigError(f"parallel.ep_size ({ep_size}) must divide model.moe.num_experts ({moe_cfg.num_experts})")
    if ep_size != 1 and not getattr(router_cls, "supports_expert_parallel", True):
        reason = getattr(router_cls, "expert_parallel_reason", "it needs the tokens of other ranks")
        raise ConfigError(f"model.moe.router={moe_cfg.router} cannot run expert-parallel "
                          f"(parallel.ep_size={ep_size}): {reason}; use parallel.ep_size=1")


__all__ = ["ROUTERS", "Router", "RoutingDecision", "build_router", "check_config", "check_router_name"]
