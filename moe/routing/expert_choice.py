"""Expert-choice router (Zhou et al. 2022): each expert picks its top-C tokens.

Scores are computed per token over experts (softmax, or sigmoid) as in the paper; then every expert
keeps the C tokens that score it highest, so each expert gets exactly C tokens (load is balanced by
construction) and a token may get 0..E experts. Its output is the score-weighted sum over the
experts that picked it; a token no expert picked passes through the residual path unchanged.

It is expressed for the shared dispatch without a routing op of its own: every token lists all E
experts (expert_indices [T, E]) with priority = its scores, and the capacity is C, so the routing
index keeps, per expert, exactly the C (token, expert) pairs of highest score (ties: earlier token).

C = capacity_factor * T * top_k / E (at least min_capacity, at most T): `top_k` is the average number
of experts per token the compute is matched to (the paper's EC-CF2 matches top-2 with capacity
factor 1 here), `capacity_factor` the slack above it. Expert choice needs a capacity in eval too:
eval_capacity_factor 0 means the training capacity_factor.

Caveats: selection over the whole micro-batch lets a token's routing depend on other (also later)
tokens of the batch, so it is not causal; in incremental generation (few tokens per forward) every
expert takes every token. Memory: the [T, E] candidate layout makes unpermute gather T * E rows.
"""
from __future__ import annotations

from typing import Optional

import torch

from moe.errors import ConfigError
from moe.routing.base import Router, RoutingDecision, check_unused


class ExpertChoiceRouter(Router):
    capacity_based = True

    @classmethod
    def validate_config(cls, cfg) -> None:
        if cfg.capacity_factor <= 0:
            raise ConfigError("model.moe.router=expert_choice selects by capacity: model.moe.capacity_factor "
                              f"must be > 0 (got {cfg.capacity_factor}; 1.0 matches the compute of top_k token "
                              "choice)")
        if cfg.capacity_factor * cfg.top_k > cfg.num_experts:
            raise ConfigError(f"model.moe.router=expert_choice: model.moe.capacity_factor ({cfg.capacity_factor}) x "
                              f"model.moe.top_k ({cfg.top_k}) must be <= model.moe.num_experts ({cfg.num_experts}); "
                              "beyond it every expert takes every token")
        if cfg.drop_policy != "probs":
            raise ConfigError("model.moe.router=expert_choice picks tokens by score: model.moe.drop_policy must be "
                              f"probs (got {cfg.drop_policy})")
        check_unused(cfg, "expert_choice", "is balanced by construction (each expert takes C tokens)",
                     "aux_loss_coef", "seq_aux_loss_coef", "global_aux_loss_coef", "bias_update_rate")
        check_unused(cfg, "expert_choice", "has no per-token top-k", "random_routing", "n_groups", "renormalize")

    def route(self, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None) -> RoutingDecision:
        logits = self.compute_logits(x)
        scores = self.score(logits)
        T, E = scores.shape
        every_expert = torch.arange(E, device=scores.device).expand(T, E).contiguous()
        return RoutingDecision(
            expert_indices=every_expert,
            gate_weights=scores,
            priority=scores,
            logits=logits,
            scores=scores,
            softmax_scores=self.cfg.score_func == "softmax",
            expert_choice=True,
        )
