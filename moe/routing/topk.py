"""Token-choice top-k router (GShard/Switch/Mixtral).

score_func=softmax: probabilities over all experts, then the top k (GShard/Switch). With
`renormalize` the k weights are rescaled to sum to 1 (equivalent to softmax after top-k, Mixtral).
score_func=sigmoid: independent per-expert scores (DeepSeek-V3), renormalised over the chosen k.
"""
from __future__ import annotations

import torch

from moe.routing.base import Router, RoutingDecision
from moe.routing.losses import load_balancing_loss, z_loss


class TopKRouter(Router):
    def forward(self, x: torch.Tensor) -> RoutingDecision:
        logits = self.compute_logits(x)
        if self.cfg.score_func == "softmax":
            scores = torch.softmax(logits, dim=-1)
        else:
            scores = torch.sigmoid(logits)
        gate_weights, expert_indices = torch.topk(scores, self.top_k, dim=-1)
        if self.cfg.renormalize or self.cfg.score_func == "sigmoid":
            gate_weights = gate_weights / gate_weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        losses = {}
        if self.cfg.aux_loss_coef > 0:
            # balancing uses normalised scores so the loss is 1 at perfect balance for both score funcs
            probs = scores if self.cfg.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
            losses["aux_loss"] = self.cfg.aux_loss_coef * load_balancing_loss(
                probs, expert_indices, self.num_experts)
        if self.cfg.z_loss_coef > 0:
            losses["z_loss"] = self.cfg.z_loss_coef * z_loss(logits)
        return RoutingDecision(
            expert_indices=expert_indices,
            gate_weights=gate_weights,
            priority=gate_weights if self.cfg.drop_policy == "probs" else None,
            logits=logits,
            scores=scores,
            losses=losses,
        )
