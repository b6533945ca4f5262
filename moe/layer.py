"""FFN layers: the dense SwiGLU FFN and the MoE layer.

The MoE layer's path for a batch: router -> routing index (which row of the expert-sorted buffer each
(token, slot) goes to; capacity drops happen here) -> permute -> experts -> unpermute (weighted
combine) -> + shared experts. Dropped (token, slot) pairs contribute nothing, so a fully dropped
token passes through the block's residual connection unchanged.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from moe import ops
from moe.experts import Experts, swiglu
from moe.routing import build_router
from moe.routing.capacity import layer_capacity


class DenseFFN(nn.Module):
    """SwiGLU FFN with fused gate/up projection: w2(silu(x W1) * (x W3))."""

    def __init__(self, d_model: int, hidden: int, init_std: float, out_std: float) -> None:
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        nn.init.normal_(self.w13.weight, std=init_std)
        nn.init.normal_(self.w2.weight, std=out_std)

    def forward(self, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.w2(swiglu(self.w13(x)))


class RouterStats:
    """Per-layer routing statistics accumulated between two metric logs (detached, on device; no host
    sync until `moe.metrics.router_metrics` reads them).

    Token-choice routers: `tokens_per_expert` counts the (token, slot) pairs each expert was chosen
    for, before capacity drops; `slots` all chosen pairs, `dropped` those dropped by capacity.
    Expert choice (every token lists every expert): `tokens_per_expert` is what each expert kept,
    and `slots`/`dropped` count tokens and the tokens no expert took. `dropped_tokens` counts tokens
    that got no expert at all (they pass through the residual path) for every router.

    Every accumulator is a float64 tensor on the layer's device (None until the first update): no
    Python number changes from call to call, so a compiled layer is not recompiled for each new value
    (torch.compile guards on Python numbers it reads).
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.tokens_per_expert: Optional[torch.Tensor] = None
        self.dropped: Optional[torch.Tensor] = None
        self.slots: Optional[torch.Tensor] = None
        self.dropped_tokens: Optional[torch.Tensor] = None
        self.entropy_sum: Optional[torch.Tensor] = None
        self.lse2_sum: Optional[torch.Tensor] = None
        self.tokens: Optional[torch.Tensor] = None
        self.calls: Optional[torch.Tensor] = None
        self.losses: Dict[str, torch.Tensor] = {}

    def _add(self, name: str, value: torch.Tensor) -> None:
        current = getattr(self, name)
        setattr(self, name, value if current is None else current + value)

    @torch.no_grad()
    def update(self, decision, index, num_tokens: int) -> None:
        E = self.num_experts
        zero = decision.scores.new_zeros((), dtype=torch.float64)
        if not decision.expert_choice and decision.slot_mask is None and index.num_dropped == 0:
            # every chosen pair kept (dropless): the kept counts are the routed counts, nothing dropped
            routed = index.tokens_per_expert[:E].double()
            slots, dropped, dropped_tokens = zero + index.dest_rows.numel(), zero, zero
        elif decision.expert_choice:
            kept = index.dest_rows >= 0
            routed = index.tokens_per_expert[:E].double()
            slots = zero + num_tokens
            dropped_tokens = (~kept.any(dim=1)).sum().double()
            dropped = dropped_tokens
        else:
            kept = index.dest_rows >= 0
            used = decision.slot_mask if decision.slot_mask is not None else torch.ones_like(kept)
            routed = decision.routed_counts(E).double()
            slots = used.sum().double()
            dropped = (used & ~kept).sum().double()
            dropped_tokens = (~(kept & used).any(dim=1)).sum().double()
        self._add("tokens_per_expert", routed)
        self._add("dropped", dropped)
        self._add("slots", slots)
        self._add("dropped_tokens", dropped_tokens)
        p = decision.scores / decision.scores.sum(-1, keepdim=True)
        self._add("entropy_sum", torch.special.entr(p).sum().double())  # -p log p, 0 at p = 0
        # the quantity the z-loss penalises, logged whatever its coefficient (0 included)
        self._add("lse2_sum", torch.logsumexp(decision.logits.float(), dim=-1).square().sum().double())
        self._add("tokens", zero + num_tokens)
        self._add("calls", zero + 1)
        for k, v in decision.losses.items():
            v = v.detach().double()
            self.losses[k] = v if k not in self.losses else self.losses[k] + v


class MoELayer(nn.Module):
    """Routed experts (+ optional shared experts) in place of a dense FFN. `forward(x[..., d],
    token_ids[...])`: token_ids (the model's input ids, same leading shape) are needed by hash routing
    only. The last-but-one dimension of x is the sequence (for the sequence-level balancing loss)."""

    def __init__(self, d_model: int, expert_hidden: int, moe_cfg, init_std: float, out_std: float) -> None:
        super().__init__()
        self.cfg = moe_cfg
        self.num_experts = moe_cfg.num_experts
        self.top_k = moe_cfg.top_k
        self.router = build_router(d_model, moe_cfg)
        self.dispatch_backend = ops.dispatch_backend(moe_cfg.dispatch)
        self.experts = Experts(moe_cfg.num_experts, d_model, expert_hidden, init_std, out_std,
                               impl=moe_cfg.experts_impl, backend=self.dispatch_backend)
        self.shared_experts = (
            DenseFFN(d_model, expert_hidden * moe_cfg.num_shared_experts, init_std, out_std)
            if moe_cfg.num_shared_experts > 0 else None
        )
        self.stats = RouterStats(moe_cfg.num_experts)
        self.aux_losses: Dict[str, torch.Tensor] = {}

    def capacity(self, num_tokens: int) -> Optional[int]:
        return layer_capacity(self.cfg, num_tokens, self.training, self.router.capacity_based)

    def forward(self, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        num_sequences = flat.shape[0] // shape[-2] if x.dim() >= 3 else 1
        ids = token_ids.reshape(-1) if token_ids is not None else None
        decision = self.router(flat, ids, num_sequences)
        E = self.num_experts
        expert_indices, gate_weights, num_buckets = decision.expert_indices, decision.gate_weights, E
        if decision.slot_mask is not None:
            # slots the router chose not to use go to a virtual expert E whose rows are never computed
            expert_indices = torch.where(decision.slot_mask, expert_indices, torch.full_like(expert_indices, E))
            gate_weights = gate_weights * decision.slot_mask
            num_buckets = E + 1
        backend = self.dispatch_backend
        index = ops.build_routing_index(expert_indices, num_buckets, self.capacity(flat.shape[0]),
                                        decision.priority, backend=backend)
        expert_in = ops.permute(flat, index, backend=backend)
        if num_buckets > E:
            counts = index.tokens_per_expert[:E]
            real = int(counts.sum())
            expert_out = self.experts(expert_in[:real], counts)
            expert_out = torch.cat([expert_out, expert_out.new_zeros(index.num_rows - real, expert_out.shape[-1])])
        else:
            expert_out = self.experts(expert_in, index.tokens_per_expert)
        out = ops.unpermute(expert_out, index, gate_weights, backend=backend)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        self.aux_losses = decision.losses if self.training else {}
        if self.training:
            self.stats.update(decision, index, flat.shape[0])
        return out.view(shape)
