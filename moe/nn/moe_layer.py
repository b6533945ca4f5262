"""The MoE layer: routed experts (+ optional shared experts) in place of a dense FFN.

Its path for a batch: router -> routing index (which row of the expert-sorted buffer each (token,
slot) goes to; capacity drops happen here) -> permute -> experts -> unpermute (weighted combine) ->
+ shared experts. Where the experts run the compiled CPU op, permute, experts and unpermute are one op
(`Experts.forward_routed`): it gathers each expert's rows from the tokens and adds the gated outputs
back into them, so neither the permuted rows nor the expert outputs are made or saved for backward.
Dropped (token, slot) pairs contribute nothing, so a fully dropped token passes through the block's
residual connection unchanged.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from moe import ops
from moe.nn.experts import Experts
from moe.nn.ffn import DenseFFN
from moe.nn.stats import RouterStats
from moe.routing import build_router
from moe.routing.capacity import layer_capacity


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
        if self.cfg.routed_scaling_factor != 1.0:
            gate_weights = gate_weights * self.cfg.routed_scaling_factor
        capacity = self.capacity(flat.shape[0])
        index = ops.build_routing_index(expert_indices, num_buckets, capacity, decision.priority,
                                        backend=self.dispatch_backend)
        out = self.routed_experts(flat, index, gate_weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        self.aux_losses = decision.losses if self.training else {}
        if self.training:
            self.stats.update(decision, index, flat.shape[0], dropless=capacity is None)
        return out.view(shape)

    def routed_experts(self, flat: torch.Tensor, index, gate_weights: torch.Tensor) -> torch.Tensor:
        """permute -> experts -> unpermute (weighted combine) of the rows `index` routes: the expert
        computation without the router, the region `train.recompute=moe` recomputes in backward
        (moe/parallel/recompute.py). It has no side effect on the layer's statistics."""
        backend, E = self.dispatch_backend, self.num_experts
        out = self.experts.forward_routed(flat, index, gate_weights)  # the compiled op does all three
        if out is not None:
            return out
        expert_in = ops.permute(flat, index, backend=backend)
        if index.tokens_per_expert.numel() > E:  # the virtual expert E of unused slots: never computed
            counts = index.tokens_per_expert[:E]
            real = int(counts.sum())
            expert_out = self.experts(expert_in[:real], counts)
            expert_out = torch.cat([expert_out, expert_out.new_zeros(index.num_rows - real, expert_out.shape[-1])])
        else:
            expert_out = self.experts(expert_in, index.tokens_per_expert)
        return ops.unpermute(expert_out, index, gate_weights, backend=backend)
