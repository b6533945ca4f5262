"""Router auxiliary losses. Each returns an unweighted scalar; the router applies its coefficient.

`probs` are router probabilities normalised over experts ([T, E], rows sum to 1); `expert_indices`
[T, k] the experts chosen per token (before any capacity drop). The three balancing losses share
the Switch form E * sum_e f_e * P_e (f_e: fraction of the (token, slot) assignments that chose e,
P_e: mean probability of e), which is 1 at perfect balance; they differ in the set of tokens f and
P are taken over, which decides whether they depend on the parallel layout.

How each loss behaves when the same global batch is cut into different micro-batches (more
data-parallel ranks or gradient-accumulation steps). The training objective is the mean of the
per-micro-batch losses (DeepSpeed divides by the accumulation steps and averages over ranks), so a
loss is layout invariant exactly when that mean does not depend on the cut:
- load_balancing_loss (Switch/GShard, per micro-batch): NOT invariant. f and P are both taken over
  the micro-batch and the mean of products is not the product of means.
- sequence_load_balancing_loss (DeepSeek-V3): invariant. It is a mean over whole sequences, and a
  micro-batch always holds whole sequences.
- global_load_balancing_loss (Qwen): invariant. f is fixed for the step (the previous step's load
  over the whole global batch, see balancing.py) and the loss is linear in P.
- z_loss (ST-MoE): invariant. It is a mean over tokens.
"""
from __future__ import annotations

import torch

from moe.ops import expert_counts


def load_balancing_loss(probs: torch.Tensor, expert_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/GShard loss: E * sum_e f_e * P_e over this batch of tokens.

    Equals 1 for a perfectly uniform router, E for one that sends everything to one expert.
    Matches megatron-core's `switch_load_balancing_loss_func` (with coeff 1).
    """
    T, k = expert_indices.shape
    counts = expert_counts(expert_indices, num_experts).to(probs.dtype)
    fraction = counts / (T * k)
    mean_prob = probs.mean(dim=0)
    return num_experts * torch.sum(fraction * mean_prob)


def sequence_load_balancing_loss(probs: torch.Tensor, expert_indices: torch.Tensor, num_experts: int,
                                 num_sequences: int) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise loss: the Switch loss of each sequence, averaged over sequences.

    The T tokens are `num_sequences` consecutive sequences of equal length (a [B, S] batch flattened).
    Matches megatron-core's `seq_aux_loss` (there computed on [S, B] layout).
    """
    T, k = expert_indices.shape
    if T % num_sequences:
        raise ValueError(f"{T} tokens do not split into {num_sequences} equal sequences")
    S = T // num_sequences
    idx = expert_indices.reshape(num_sequences, S * k)
    counts = torch.zeros(num_sequences, num_experts, dtype=probs.dtype, device=probs.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=probs.dtype))
    fraction = counts / (S * k)
    mean_prob = probs.reshape(num_sequences, S, num_experts).mean(dim=1)
    return num_experts * (fraction * mean_prob).sum(dim=-1).mean()


def global_load_balancing_loss(probs: torch.Tensor, load_fraction: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Global-batch loss (Qiu et al. 2025): E * sum_e f_e * P_e with f given (the load fraction over a
    global batch, summing to 1) and P_e this micro-batch's mean probability. Linear in P, so the mean
    over micro-batches equals the loss over the whole global batch. With f = this batch's own load
    fraction it equals load_balancing_loss."""
    return num_experts * torch.sum(load_fraction.to(probs.dtype) * probs.mean(dim=0))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2; keeps logits small."""
    return z_loss_of_logsumexp(torch.logsumexp(logits, dim=-1))


def z_loss_of_logsumexp(lse: torch.Tensor) -> torch.Tensor:
    """The z-loss from the logits' logsumexp over the experts [T] (when the caller keeps it for more)."""
    return lse.square().mean()
