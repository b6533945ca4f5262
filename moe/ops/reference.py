"""The pure-PyTorch reference of every dispatch op: what the compiled backend (moe._C) must equal and
what runs wherever it is not built.

- `build_routing_index_reference(expert_indices[T, k], num_experts, capacity, priority)` ->
  RoutingIndex: per-expert kept counts and, for each (token, slot), its row in the expert-sorted
  buffer (-1 when dropped). Within an expert, rows are in token order (stable): deterministic.
- `permute_reference(x[T, d], index)` -> [rows, d]: token rows gathered into expert order.
- `unpermute_reference(y[rows, d], index, gate_weights[T, k])` -> [T, d]: each token's weighted sum
  of its expert outputs; dropped slots contribute zero.
- `expert_counts`: a static-shape bincount, shared by the reference and the routers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RoutingIndex:
    tokens_per_expert: torch.Tensor
    """[E] int64: kept (token, slot) pairs per expert."""
    dest_rows: torch.Tensor
    """[T, k] int64: row of each (token, slot) in the permuted buffer, -1 when dropped."""
    source_tokens: torch.Tensor
    """[rows] int64: the token each permuted row came from."""
    num_rows: int
    """Kept (token, slot) pairs = rows of the permuted buffer."""
    num_dropped: int
    """Dropped (token, slot) pairs."""


def expert_counts(expert_indices: torch.Tensor, num_experts: int,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[E] int64: how many entries of `expert_indices` (any shape) name each expert; with `mask` (same
    shape, bool) only the True ones. Unlike bincount (whose length depends on the largest index) the
    shape is static, so it stays inside a compiled graph and makes no host sync on a GPU."""
    idx = expert_indices.reshape(-1).long()
    ones = torch.ones_like(idx) if mask is None else mask.reshape(-1).long()
    return torch.zeros(num_experts, dtype=torch.long, device=idx.device).index_add_(0, idx, ones)


def build_routing_index_reference(expert_indices: torch.Tensor, num_experts: int,
                                  capacity: Optional[int] = None,
                                  priority: Optional[torch.Tensor] = None) -> RoutingIndex:
    """Reference: sorts (the compiled backend uses a counting sort; results are identical).

    With a capacity, an expert keeps its `capacity` (token, slot) pairs of highest `priority`
    (ties and priority=None: earliest token first); the rest are dropped.
    """
    T, k = expert_indices.shape
    flat = expert_indices.reshape(-1).long()
    n = flat.numel()
    dev = flat.device
    if n and dev.type == "cpu" and not torch.compiler.is_compiling():
        # free on the host; on a GPU it would be a sync (dropless, index_add_ asserts on the device)
        bad = (flat < 0) | (flat >= num_experts)
        if bad.any():
            raise RuntimeError(f"routing index: expert index {int(flat[bad][0])} outside [0, {num_experts})")
    if capacity is not None:
        key, num_rows, tokens_per_expert = _capacity_keys(flat, num_experts, capacity, priority)
    else:  # dropless: every pair kept, so the size is known and nothing waits for the device
        key, num_rows = flat, n
        tokens_per_expert = expert_counts(flat, num_experts)
    sorted_pairs = torch.argsort(key, stable=True)
    kept_pairs = sorted_pairs[:num_rows]
    dest = torch.full((n,), -1, dtype=torch.long, device=dev)
    dest[kept_pairs] = torch.arange(num_rows, device=dev)
    return RoutingIndex(
        tokens_per_expert=tokens_per_expert,
        dest_rows=dest.view(T, k),
        source_tokens=kept_pairs // k,
        num_rows=num_rows,
        num_dropped=n - num_rows,
    )


def _capacity_keys(flat: torch.Tensor, num_experts: int, capacity: int,
                   priority: Optional[torch.Tensor]) -> tuple:
    """(sort key of each pair: its expert, or num_experts when dropped; kept rows; kept per expert)."""
    n, dev = flat.numel(), flat.device
    if priority is None:
        order = torch.arange(n, device=dev)
    else:
        order = torch.argsort(priority.reshape(-1).float(), descending=True, stable=True)
    order = order[torch.argsort(flat[order], stable=True)]
    counts_all = expert_counts(flat, num_experts)
    starts = torch.cumsum(counts_all, 0) - counts_all
    rank = torch.empty(n, dtype=torch.long, device=dev)
    rank[order] = torch.arange(n, device=dev) - starts[flat[order]]
    kept = rank < capacity
    key = torch.where(kept, flat, torch.full_like(flat, num_experts))
    num_rows = int(kept.sum())  # data dependent: a host sync
    return key, num_rows, expert_counts(flat, num_experts, kept)


def permute_reference(x: torch.Tensor, index: RoutingIndex) -> torch.Tensor:
    return x.index_select(0, index.source_tokens)


def unpermute_reference(y: torch.Tensor, index: RoutingIndex, gate_weights: torch.Tensor) -> torch.Tensor:
    dest = index.dest_rows
    valid = dest >= 0
    if y.shape[0] == 0:  # every pair dropped: nothing to gather (index_select cannot read an empty y)
        y = y.new_zeros(1, *y.shape[1:]) + 0 * y.sum()
    gathered = y.index_select(0, dest.clamp(min=0).reshape(-1)).view(*dest.shape, y.shape[-1])
    weights = (gate_weights * valid).to(y.dtype)
    return torch.einsum("tkd,tk->td", gathered, weights)
