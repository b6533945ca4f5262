"""Switch Transformer router (Fedus et al. 2021): token-choice top-1.

The same computation as `topk` with top_k = 1; a name of its own so an ablation says what it is.
Switch's other ingredients are knobs: jitter_eps (0.01 in the paper), capacity_factor (1.25 in
training), aux_loss_coef (0.01) and z_loss_coef.
"""
from __future__ import annotations

from moe.errors import ConfigError
from moe.routing.topk import TopKRouter


class SwitchRouter(TopKRouter):
    @classmethod
    def validate_config(cls, cfg) -> None:
        if cfg.top_k != 1:
            raise ConfigError(f"model.moe.router=switch sends each token to one expert: set model.moe.top_k=1 "
                              f"(got {cfg.top_k}), or use router=topk")
