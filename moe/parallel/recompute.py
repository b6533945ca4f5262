"""Activation recompute (`train.recompute`), applied to a built model from outside: the model file never
sees it, and parameter names and state dicts are unchanged (checkpoints resume across modes).

- `none`: every activation is kept for backward.
- `moe`: each MoE layer's expert computation (permute -> experts -> unpermute, MoELayer
  `routed_experts`; not the router) keeps only its inputs and runs again in backward. It frees the
  expert-sorted rows, the experts' hidden activations and outputs: the largest activations of an MoE
  block when top_k x expert_hidden is large.
- `full`: each transformer block keeps only its input and runs again in backward (one extra forward
  per step; live activations drop to one block's plus every block's input).

Both use non-reentrant `torch.utils.checkpoint` with the RNG state preserved, so routers that draw
random numbers (noisy gating, input jitter, GShard random routing, all from torch's global generator)
draw the same numbers again when a block is recomputed.

Counted once. A recomputed forward would run the side effects of a forward a second time: router
statistics (RouterStats), the layer's auxiliary losses, the per-step load feeding the aux-loss-free
bias and the global-batch loss (`Router.step_load`), the per-source expert counts of a data mixture
(`RouterStats.domain`), and the token exchange's row telemetry
(torchtitan PR #4772 and megatron-core PR #1433 fixed this class of bug: router losses counted twice
under recompute). The recompute context (`checkpoint(context_fn=...)`) snapshots that state of the
MoE layers in the region when the recomputation starts and restores it when it ends, whether the
recomputation runs to the end or stops early: whatever the recomputed forward accumulated is
discarded, and what the forward counted stays.

Expert parallelism: a recomputed expert region exchanges its tokens again (two all-to-alls forward in
the recompute, on top of the two forward and two backward ones): `moe bench memory` measures what
it costs. Its wall time is part of the exchange telemetry (`ep/exchange_s`); its rows are not.

torch.compile (train.compile): under `full`, each block's forward is compiled and the compiled forward
is checkpointed (the recompute runs the compiled code again); under `moe` the block is compiled and
the checkpointed expert region runs eagerly between its compiled parts (dynamo does not trace a
checkpoint with a recompute context).
"""
from __future__ import annotations

import contextlib
from typing import Callable, List

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe.nn.moe_layer import MoELayer

RECOMPUTE_MODES = ("none", "moe", "full")
STATS_FIELDS = ("packed", "loss_names", "domain")
"""What RouterStats.update accumulates (reassigned, never changed in place): put back as it was."""


class KeepSideEffects:
    """Context manager: on exit, puts back the forward side effects of `layers` (MoE layers) as they
    were on entry (router statistics, auxiliary losses, the router's step load, exchange telemetry)."""

    def __init__(self, layers: List[MoELayer]) -> None:
        self.layers = layers
        self.saved: list = []

    def __enter__(self) -> "KeepSideEffects":
        self.saved = []
        for layer in self.layers:
            step_load = getattr(layer.router, "step_load", None)
            exchange = getattr(layer.experts, "token_exchange", None)
            self.saved.append((
                {name: getattr(layer.stats, name, None) for name in STATS_FIELDS}, layer.aux_losses,
                None if step_load is None else step_load.clone(),
                None if exchange is None else (exchange.rows, len(exchange._pending)),
            ))
        return self

    def __exit__(self, *exc) -> None:
        for layer, (stats, aux, step_load, exchange) in zip(self.layers, self.saved):
            for name, value in stats.items():
                setattr(layer.stats, name, value)
            layer.aux_losses = aux
            if step_load is not None:
                layer.router.step_load.copy_(step_load)
            if exchange is not None:
                ex = layer.experts.token_exchange
                ex.rows = exchange[0]
                del ex._pending[exchange[1]:]  # a recomputation stopped between dispatch and combine
        self.saved = []


def checkpointed(fn: Callable, region: nn.Module) -> Callable:
    """`fn` under non-reentrant activation checkpointing; the recomputation leaves the side effects of
    the MoE layers inside `region` as the forward left them."""
    layers = [m for m in region.modules() if isinstance(m, MoELayer)]

    def contexts():
        return contextlib.nullcontext(), KeepSideEffects(layers)

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to recompute
            return fn(*args, **kwargs)
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=contexts, **kwargs)

    return run


def apply_recompute(model: nn.Module, mode: str, compile_blocks: bool = False) -> None:
    """Activation recompute of `mode` (RECOMPUTE_MODES) on the model's blocks, in place, and the
    torch.compile of train.compile when `compile_blocks` (see the module docstring for how the two
    combine). Parameters, buffers and their names are untouched."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"train.recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {mode!r}")
    for block in model.blocks:
        if mode == "full":
            forward = torch.compile(block.forward) if compile_blocks else block.forward
            block.forward = checkpointed(forward, block)
            continue
        if mode == "moe" and isinstance(block.ffn, MoELayer):
            layer = block.ffn
            layer.routed_experts = torch.compiler.disable(checkpointed(layer.routed_experts, layer))
        if compile_blocks:
            block.compile()
