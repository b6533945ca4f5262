"""Hash router (Hash Layers, Roller et al. 2021): experts chosen by a fixed hash of the token id.

Selection uses no learned parameter and no hidden-state value: token id t goes to the top_k experts
of a fixed pseudo-random ranking h(seed, t, e) (a 32-bit integer mix), i.e. a uniformly random set
of k distinct experts per vocabulary entry, the same on every device and run. With top_k = 1 the
gate is 1 (the paper's hash layer); with top_k > 1 the gates are the router's scores of the chosen
experts renormalised to sum to 1, so the router learns how to mix, never whom to pick.

The model passes its input token ids down (GPT.forward -> Block -> MoELayer -> router). Noise,
balancing losses and the selection bias have nothing to act on and are rejected by validate.
"""
from __future__ import annotations

from typing import Optional

import torch

from moe.routing.base import Router, RoutingDecision, check_unused

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (int64 tensors holding values in [0, 2^32); no overflow)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def hash_scores(token_ids: torch.Tensor, num_experts: int, seed: int = 0) -> torch.Tensor:
    """[T, E] int64 fixed pseudo-random ranking of the experts for each token id."""
    ids = token_ids.reshape(-1).long()
    key = (ids[:, None] * num_experts + torch.arange(num_experts, device=ids.device)) & _MASK32
    salt = int(_mix32(torch.tensor(seed & _MASK32) + 0x9E3779B9 & _MASK32))
    return _mix32(_mix32(key) ^ salt)


class HashRouter(Router):
    @classmethod
    def validate_config(cls, cfg) -> None:
        check_unused(cfg, "hash", "selects by a fixed token-id hash (nothing learned to perturb)",
                     "noisy_gating", "jitter_eps", "random_routing")
        check_unused(cfg, "hash", "cannot be balanced by training (its selection ignores the router)",
                     "aux_loss_coef", "seq_aux_loss_coef", "global_aux_loss_coef", "bias_update_rate", "n_groups")

    def route(self, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None) -> RoutingDecision:
        if token_ids is None:
            raise ValueError("model.moe.router=hash needs the input token ids: call MoELayer(x, token_ids=...) "
                             "(GPT passes them)")
        if token_ids.numel() != x.shape[0]:
            raise ValueError(f"router=hash: {token_ids.numel()} token ids for {x.shape[0]} tokens")
        logits = self.compute_logits(x)
        scores = self.score(logits)
        ranking = hash_scores(token_ids.to(x.device), self.num_experts, self.cfg.hash_seed)
        expert_indices = torch.sort(ranking, dim=-1, descending=True, stable=True).indices[:, :self.top_k]
        chosen = scores.gather(1, expert_indices)
        gate_weights = chosen / chosen.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return self.token_choice_decision(expert_indices, gate_weights, logits, scores)
