"""FFN layers: the dense SwiGLU FFN and the MoE layer.

The MoE layer's path for a batch: router -> routing index (which row of the expert-sorted buffer each
(token, slot) goes to; capacity drops happen here) -> permute -> experts -> unpermute (weighted
combine) -> + shared experts. Dropped (token, slot) pairs contribute nothing, so a fully dropped
token passes through the block's residual connection unchanged.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from moe import ops
from moe.nn.experts import Experts, swiglu
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

    Everything accumulates in one float64 vector on the layer's device, `packed` = [tokens_per_expert
    (E) | SCALARS | the weighted losses named in `loss_names`] (None until the first update; the
    layout metrics all-reduces). One tensor and no Python number that changes from call to call, so a
    compiled layer is not recompiled for new values (torch.compile guards on Python numbers) nor for
    two statistics that happen to be the same tensor.
    """

    SCALARS = ("dropped", "slots", "dropped_tokens", "tokens", "entropy_sum", "calls", "lse2_sum")

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.packed: Optional[torch.Tensor] = None
        self.loss_names: Tuple[str, ...] = ()

    def __getattr__(self, name: str):
        # the packed entries by name (tokens_per_expert, the SCALARS, losses): for readers and tests
        if "packed" in self.__dict__ and (name in RouterStats.SCALARS or name in ("tokens_per_expert", "losses")):
            packed, E = self.__dict__["packed"], self.__dict__["num_experts"]
            if packed is None:
                return None if name != "losses" else {}
            if name == "tokens_per_expert":
                return packed[:E]
            if name == "losses":
                return {n: packed[E + len(self.SCALARS) + i] for i, n in enumerate(self.loss_names)}
            return packed[E + self.SCALARS.index(name)]
        raise AttributeError(name)

    @torch.no_grad()
    def update(self, decision, index, num_tokens: int, dropless: bool) -> None:
        """dropless: the layer ran without a capacity, so nothing was dropped (static, unlike the
        kept-row count a capacity makes data dependent)."""
        E = self.num_experts
        zero = decision.scores.new_zeros((), dtype=torch.float64)
        if not decision.expert_choice and decision.slot_mask is None and dropless:
            # every chosen pair kept: the kept counts are the routed counts, nothing dropped
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
        p = decision.scores / decision.scores.sum(-1, keepdim=True)
        entropy = torch.special.entr(p).sum().double()  # -p log p, 0 at p = 0
        # the quantity the z-loss penalises, logged whatever its coefficient (0 included)
        lse2 = torch.logsumexp(decision.logits.float(), dim=-1).square().sum().double()
        names = tuple(sorted(decision.losses))
        scalars = [dropped, slots, dropped_tokens, zero + num_tokens, entropy, zero + 1, lse2]
        scalars += [decision.losses[n].detach().double().reshape(()) for n in names]
        packed = torch.cat([routed, torch.stack(scalars)])
        if self.packed is None:
            self.packed, self.loss_names = packed, names
        elif names != self.loss_names:
            raise RuntimeError(f"router losses changed between forward passes: {self.loss_names} -> {names}")
        else:
            self.packed = self.packed + packed


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
        capacity = self.capacity(flat.shape[0])
        index = ops.build_routing_index(expert_indices, num_buckets, capacity, decision.priority, backend=backend)
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
            self.stats.update(decision, index, flat.shape[0], dropless=capacity is None)
        return out.view(shape)
