"""Token-choice top-k router (GShard/Switch/Mixtral/DeepSeek-V3).

score_func=softmax: probabilities over all experts, then the top k (GShard/Switch). With
`renormalize` the k weights are rescaled to sum to 1, which is exactly softmax after top-k
(Mixtral): softmax is monotonic, so the same k win, and exp(l_i) / sum_k exp(l_j) is the ratio of
their probabilities.
score_func=sigmoid: independent per-expert scores (DeepSeek-V3), renormalised over the chosen k when
k > 1 (the raw score when k = 1, so the router still learns from the LM loss).

Knobs (all in MoEConfig): `bias_update_rate` (the aux-loss-free bias joins the scores for selection
only), `n_groups`/`topk_groups` (group-limited routing), `random_routing` (GShard: the 2nd expert is
used with probability min(1, 2 * g2 / (g1 + g2)) in training), `noisy_gating` and `jitter_eps`
(base.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from moe.routing.base import Router, RoutingDecision


def group_limited_topk(scores: torch.Tensor, k: int, n_groups: int, topk_groups: int) -> torch.Tensor:
    """DeepSeek-V3 group-limited selection: the experts form n_groups equal groups; a group's score is
    the sum of its top k // topk_groups scores; each token keeps its topk_groups best groups and picks
    its top-k experts inside them. Returns [T, k] indices (same rule as megatron-core)."""
    T, E = scores.shape
    group_scores = scores.view(T, n_groups, E // n_groups).topk(k // topk_groups, dim=-1).values.sum(-1)
    group_idx = group_scores.topk(topk_groups, dim=-1).indices
    group_mask = torch.zeros(T, n_groups, dtype=torch.bool, device=scores.device).scatter_(1, group_idx, True)
    expert_mask = group_mask.repeat_interleave(E // n_groups, dim=1)
    return scores.masked_fill(~expert_mask, float("-inf")).topk(k, dim=-1).indices


class TopKRouter(Router):
    def route(self, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None) -> RoutingDecision:
        logits = self.compute_logits(x)
        scores = self.score(logits)
        selection = self.selection_scores(scores)
        if self.cfg.n_groups > 0:
            expert_indices = group_limited_topk(selection, self.top_k, self.cfg.n_groups, self.cfg.topk_groups)
        else:
            expert_indices = self.top_k_indices(selection, self.top_k)
        gate_weights = self.gates(scores.gather(1, expert_indices))
        slot_mask = self._random_routing_mask(gate_weights) if self.cfg.random_routing and self.training else None
        return self.token_choice_decision(expert_indices, gate_weights, logits, scores, slot_mask)

    @staticmethod
    @torch.no_grad()
    def _random_routing_mask(gate_weights: torch.Tensor) -> torch.Tensor:
        """GShard: keep the weaker of the two experts with probability min(1, 2 * g2 / (g1 + g2))."""
        g = gate_weights / gate_weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        weaker = g.argmin(dim=-1, keepdim=True)
        keep = torch.rand(g.shape[0], 1, device=g.device) < 2 * g.gather(1, weaker)
        mask = torch.ones_like(g, dtype=torch.bool)
        return mask.scatter_(1, weaker, keep)
