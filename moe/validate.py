"""validate(cfg): the one config validation every caller runs, before any model or data is built and
before anything is written.

It is composed here and not in moe.config because the config is the bottom layer of the package (it
imports only moe.io and moe.errors): it can check its own fields, but the knobs whose meaning belongs
to a component above it (the router families, the expert backends, the corpora) are checked by that
component, which knows its registry. This module sits above all of them and runs, in order:

1. moe.config: every numeric knob in its range, then the model's shape;
2. with experts: a known router (moe.routing), the MoE knobs that are plain config (moe.config), the
   expert backend (moe.nn.experts), then the router family's own checks and the expert-parallel
   layout (moe.routing);
3. moe.config: the parallel layout, training, logging and the run name;
4. moe.data: the `data` section (no data is read).

The order is part of the behaviour: a config with several faults reports the same (first) one as
before the checks were split by component. Every error is a one-line ConfigError naming the key.
"""
from __future__ import annotations

from moe import data, routing
from moe.config import Config
from moe.config.checks import check_moe_fields, check_ranges_and_shape, check_run_fields
from moe.nn import experts


def validate(cfg: Config, world_size: int = 1) -> None:
    """Raise a ConfigError naming the key of the first check `cfg` fails at `world_size` ranks."""
    check_ranges_and_shape(cfg)
    check_moe(cfg)
    check_run_fields(cfg, world_size)
    data.check_config(cfg.data)


def check_moe(cfg: Config) -> None:
    """The MoE knobs (nothing to check for a dense model), the config's own and the components'."""
    routing.check_router_name(cfg.model.moe)
    check_moe_fields(cfg.model)
    experts.check_config(cfg.model)
    routing.check_config(cfg.model, cfg.parallel)


__all__ = ["validate"]
