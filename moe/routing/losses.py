"""Router auxiliary losses. Each returns an unweighted scalar; the router applies its coefficient."""
from __future__ import annotations

import torch


def load_balancing_loss(scores: torch.Tensor, expert_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/GShard loss: E * sum_e f_e * P_e, where f_e is the fraction of (token, slot) assignments
    that chose expert e (counted before any capacity drop) and P_e the mean router probability of e.

    Equals 1 for a perfectly uniform router, E for one that sends everything to one expert.
    Matches megatron-core's `switch_load_balancing_loss_func` (with coeff 1).
    """
    T, k = expert_indices.shape
    counts = torch.bincount(expert_indices.reshape(-1), minlength=num_experts).to(scores.dtype)
    fraction = counts / (T * k)
    mean_prob = scores.mean(dim=0)
    return num_experts * torch.sum(fraction * mean_prob)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2; keeps logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()
