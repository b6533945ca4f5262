"""Sinkhorn router (BASE layers, Lewis et al. 2021; Megatron's `sinkhorn` routing).

In training the selection is made on a balanced version of the router's assignment: Sinkhorn-Knopp
rescales exp(logits) [T, E] so every token's row sums to 1/T and every expert's column to 1/E (a
doubly stochastic matrix up to those scales), and each token takes its top-k experts in it. That
approximates the balanced assignment of BASE layers without a linear-assignment solve. The gate
weights come from the unbalanced scores (score_func of the logits, renormalised as in `topk`), so the
router still learns from the LM loss. In eval the selection is the plain top-k of the scores, as in
BASE layers and Megatron.

The iteration runs in the log domain for a fixed `sinkhorn_iters` (no data-dependent loop, no host
sync); it ends with a column step, so the columns are exact and the rows approximate.

Limit (shared with Megatron's router, not with BASE's exact assignment): the plan is balanced as a
fractional assignment, and each token rounds it to its own top-k. Tokens with near-identical logits
(in byte-level code: runs of indentation spaces) share one row shape and round to the same experts,
so the realised load is not perfectly even; add a capacity_factor to bound it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from moe.routing.base import Router, RoutingDecision, check_unused


@torch.no_grad()
def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """diag(u) exp(logits) diag(v) with rows summing to 1/T and columns to 1/E (after `iters` steps).
    The same iteration as megatron-core's `sinkhorn`, in log space."""
    logp = logits.float()
    T, E = logp.shape
    log_u = torch.zeros(T, device=logp.device)
    log_v = torch.zeros(E, device=logp.device)
    for _ in range(iters):
        log_u = -math.log(T) - torch.logsumexp(logp + log_v, dim=1)
        log_v = -math.log(E) - torch.logsumexp(logp + log_u[:, None], dim=0)
    return torch.exp(logp + log_u[:, None] + log_v)


class SinkhornRouter(Router):
    @classmethod
    def validate_config(cls, cfg) -> None:
        check_unused(cfg, "sinkhorn", "balances the selection itself", "bias_update_rate")
        check_unused(cfg, "sinkhorn", "selects on the balanced assignment", "random_routing", "n_groups")

    def route(self, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None) -> RoutingDecision:
        logits = self.compute_logits(x)
        scores = self.score(logits)
        if self.training:
            expert_indices = self.top_k_indices(sinkhorn(logits, self.cfg.sinkhorn_iters), self.top_k)
        else:
            expert_indices = self.top_k_indices(scores, self.top_k)
        gate_weights = self.gates(scores.gather(1, expert_indices))
        return self.token_choice_decision(expert_indices, gate_weights, logits, scores)
