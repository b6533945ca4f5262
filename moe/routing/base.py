"""What every router returns, and the base class routers share."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn


@dataclass
class RoutingDecision:
    """A router's output for T tokens. Dispatch only moves tokens; it never looks inside this."""

    expert_indices: torch.Tensor
    """[T, k] int64: the experts each token goes to."""
    gate_weights: torch.Tensor
    """[T, k] fp32: the weight of each expert's output in the token's combination."""
    priority: Optional[torch.Tensor]
    """[T, k]: which (token, slot) an over-full expert keeps first (higher first); None = by position."""
    logits: torch.Tensor
    """[T, E] fp32 router logits (for z-loss and statistics)."""
    scores: torch.Tensor
    """[T, E] fp32 router probabilities over experts (softmax or sigmoid of the logits)."""
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Coefficient-weighted auxiliary losses (`aux_loss`, `z_loss`), added to the training loss."""


class Router(nn.Module):
    """Maps hidden states [T, d] to a RoutingDecision. Runs in fp32 whatever the model dtype."""

    def __init__(self, d_model: int, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    @classmethod
    def validate_config(cls, cfg) -> None:
        """Raise moe.config.ConfigError for settings this router cannot honour."""

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 routing: bf16 logits flip top-k choices between otherwise identical runs
        return torch.nn.functional.linear(x.float(), self.weight.float())
