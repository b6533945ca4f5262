"""Shared helpers of the router tests."""

from moe.config import load_config
from moe.layer import MoELayer
from moe.routing import build_router


def moe_cfg(*overrides, num_experts=4):
    return load_config(None, ["model.vocab_size=10", f"model.moe.num_experts={num_experts}", *overrides]).model.moe


def router(*overrides, d=4, num_experts=4):
    return build_router(d, moe_cfg(*overrides, num_experts=num_experts))


def layer(*overrides, d=16, hidden=32, num_experts=4):
    return MoELayer(d, hidden, moe_cfg(*overrides, num_experts=num_experts), 0.02, 0.02)

