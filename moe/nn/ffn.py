"""The dense SwiGLU FFN, and the SwiGLU activation every FFN (dense, shared and routed experts) uses."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(h13: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, for the fused gate/up projection h13 = [gate | up] (last dimension)."""
    gate, up = h13.chunk(2, dim=-1)
    return F.silu(gate) * up


class DenseFFN(nn.Module):
    """SwiGLU FFN with fused gate/up projection: w2(silu(x W1) * (x W3))."""

    def __init__(self, d_model: int, hidden: int, init_std: float, out_std: float) -> None:
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        nn.init.normal_(self.w13.weight, std=init_std)
        nn.init.normal_(self.w2.weight, std=out_std)

    def forward(self, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.w2(swiglu(self.w13(x)))
