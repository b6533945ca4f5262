"""FFN layers: the dense SwiGLU FFN and the MoE layer.

The MoE layer's path for a batch: router -> routing index (which row of the expert-sorted buffer each
(token, slot) goes to; capacity drops happen here) -> permute -> experts -> unpermute (weighted
combine) -> + shared experts. Dropped (token, slot) pairs contribute nothing, so a fully dropped
token passes through the block's residual connection unchanged.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe import ops
from moe.experts import Experts, swiglu
from moe.routing import build_router


class DenseFFN(nn.Module):
    """SwiGLU FFN with fused gate/up projection: w2(silu(x W1) * (x W3))."""

    def __init__(self, d_model: int, hidden: int, init_std: float, out_std: float) -> None:
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        nn.init.normal_(self.w13.weight, std=init_std)
        nn.init.normal_(self.w2.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w13(x)))


class RouterStats:
    """Per-layer routing statistics accumulated between two metric logs (detached, on device)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.tokens_per_expert: Optional[torch.Tensor] = None
        self.dropped = 0.0
        self.slots = 0.0
        self.entropy_sum: Optional[torch.Tensor] = None
        self.tokens = 0
        self.losses: Dict[str, torch.Tensor] = {}
        self.calls = 0

    @torch.no_grad()
    def update(self, decision, index, num_tokens: int) -> None:
        routed = torch.bincount(decision.expert_indices.reshape(-1), minlength=self.num_experts).double()
        self.tokens_per_expert = routed if self.tokens_per_expert is None else self.tokens_per_expert + routed
        self.dropped += index.num_dropped
        self.slots += decision.expert_indices.numel()
        p = decision.scores / decision.scores.sum(-1, keepdim=True)
        ent = -(p * torch.log(p.clamp_min(1e-20))).sum(-1).sum().double()
        self.entropy_sum = ent if self.entropy_sum is None else self.entropy_sum + ent
        self.tokens += num_tokens
        for k, v in decision.losses.items():
            self.losses[k] = self.losses.get(k, 0.0) + v.detach().double()
        self.calls += 1


class MoELayer(nn.Module):
    def __init__(self, d_model: int, expert_hidden: int, moe_cfg, init_std: float, out_std: float) -> None:
        super().__init__()
        self.cfg = moe_cfg
        self.num_experts = moe_cfg.num_experts
        self.top_k = moe_cfg.top_k
        self.router = build_router(d_model, moe_cfg)
        self.experts = Experts(moe_cfg.num_experts, d_model, expert_hidden, init_std, out_std,
                               impl=moe_cfg.experts_impl)
        self.shared_experts = (
            DenseFFN(d_model, expert_hidden * moe_cfg.num_shared_experts, init_std, out_std)
            if moe_cfg.num_shared_experts > 0 else None
        )
        self.dispatch_backend = ops.dispatch_backend(moe_cfg.dispatch)
        self.stats = RouterStats(moe_cfg.num_experts)
        self.aux_losses: Dict[str, torch.Tensor] = {}

    def capacity(self, num_tokens: int) -> Optional[int]:
        factor = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        return ops.expert_capacity(num_tokens, self.top_k, self.num_experts, factor, self.cfg.min_capacity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        decision = self.router(flat)
        backend = self.dispatch_backend
        index = ops.build_routing_index(decision.expert_indices, self.num_experts,
                                        self.capacity(flat.shape[0]), decision.priority, backend=backend)
        expert_in = ops.permute(flat, index, backend=backend)
        expert_out = self.experts(expert_in, index.tokens_per_expert)
        out = ops.unpermute(expert_out, index, decision.gate_weights, backend=backend)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        self.aux_losses = decision.losses if self.training else {}
        if self.training:
            self.stats.update(decision, index, flat.shape[0])
        return out.view(shape)
