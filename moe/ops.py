"""Token dispatch ops: route (token, slot) pairs into an expert-contiguous buffer and back.

Three ops, each differentiable:
- `build_routing_index(expert_indices[T, k], num_experts, capacity, priority)` -> RoutingIndex:
  per-expert kept counts and, for each (token, slot), its row in the expert-sorted buffer (-1 when
  dropped). Within an expert, rows are in token order (stable), so results are deterministic.
- `permute(x[T, d], index)` -> [rows, d]: gather token rows into expert order (dropped slots skipped).
- `unpermute(y[rows, d], index, gate_weights[T, k])` -> [T, d]: each token's weighted sum of its
  expert outputs; dropped slots contribute zero (the residual path carries the token unchanged).

This file holds the pure-PyTorch reference. A compiled backend, when present, is chosen by
`dispatch_backend()`; the reference is always importable and is what tests compare against.
"""
from __future__ import annotations

import os
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


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float,
                    min_capacity: int) -> Optional[int]:
    """Per-expert capacity, or None for dropless (capacity_factor == 0)."""
    if capacity_factor <= 0:
        return None
    import math

    return max(min_capacity, int(math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


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
    if capacity is not None:
        if priority is None:
            order = torch.arange(n, device=dev)
        else:
            order = torch.argsort(priority.reshape(-1).float(), descending=True, stable=True)
        order = order[torch.argsort(flat[order], stable=True)]
        counts_all = torch.bincount(flat, minlength=num_experts)
        starts = torch.cumsum(counts_all, 0) - counts_all
        rank = torch.empty(n, dtype=torch.long, device=dev)
        rank[order] = torch.arange(n, device=dev) - starts[flat[order]]
        kept = rank < capacity
    else:
        kept = torch.ones(n, dtype=torch.bool, device=dev)
    key = torch.where(kept, flat, torch.full_like(flat, num_experts))
    sorted_pairs = torch.argsort(key, stable=True)
    num_rows = int(kept.sum())
    kept_pairs = sorted_pairs[:num_rows]
    dest = torch.full((n,), -1, dtype=torch.long, device=dev)
    dest[kept_pairs] = torch.arange(num_rows, device=dev)
    return RoutingIndex(
        tokens_per_expert=torch.bincount(flat[kept], minlength=num_experts),
        dest_rows=dest.view(T, k),
        source_tokens=kept_pairs // k,
        num_rows=num_rows,
        num_dropped=n - num_rows,
    )


def permute_reference(x: torch.Tensor, index: RoutingIndex) -> torch.Tensor:
    return x.index_select(0, index.source_tokens)


def unpermute_reference(y: torch.Tensor, index: RoutingIndex, gate_weights: torch.Tensor) -> torch.Tensor:
    dest = index.dest_rows
    valid = dest >= 0
    gathered = y.index_select(0, dest.clamp(min=0).reshape(-1)).view(*dest.shape, y.shape[-1])
    weights = (gate_weights * valid).to(y.dtype)
    return torch.einsum("tkd,tk->td", gathered, weights)


# ------------------------------------------------------------------------------------ backend choice


def extension_available() -> bool:
    """True when the compiled dispatch extension is importable."""
    try:
        import moe._C  # noqa: F401
    except Exception:
        return False
    return True


def dispatch_backend(requested: str = "auto") -> str:
    """Resolve `auto|extension|reference` to the backend that will run. MOE_DISPATCH overrides."""
    forced = os.environ.get("MOE_DISPATCH")
    if forced:
        requested = forced
    if requested == "reference":
        return "reference"
    if requested == "extension":
        if not extension_available():
            raise RuntimeError("model.moe.dispatch=extension but the compiled extension moe._C is not "
                               "built; reinstall with `make install` or use dispatch=reference")
        return "extension"
    return "extension" if extension_available() else "reference"


def build_routing_index(expert_indices: torch.Tensor, num_experts: int, capacity: Optional[int] = None,
                        priority: Optional[torch.Tensor] = None, backend: str = "reference") -> RoutingIndex:
    return build_routing_index_reference(expert_indices, num_experts, capacity, priority)


def permute(x: torch.Tensor, index: RoutingIndex, backend: str = "reference") -> torch.Tensor:
    return permute_reference(x, index)


def unpermute(y: torch.Tensor, index: RoutingIndex, gate_weights: torch.Tensor,
              backend: str = "reference") -> torch.Tensor:
    return unpermute_reference(y, index, gate_weights)
