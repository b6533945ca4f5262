"""The optimizer step, written once: `moe train`, the `moe parity` workers and `moe bench train` all
run this function, so parity and the benchmark check and time exactly what training runs.

One step is `accum` micro-batches of forward and backward through the DeepSpeed engine; at the
accumulation boundary the gradient norm is read (before the engine's step without ZeRO, whose step
clips and consumes the gradients; after it under ZeRO 1/2, which computes the norm inside its
step), the engine steps, and the routers end the optimizer step (the step's expert load drives the
auxiliary-loss-free bias and the global-batch balancing loss).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import torch

from moe.parallel import grad_norm as global_grad_norm
from moe.routing.balancing import end_optimizer_step


@dataclass
class StepResult:
    loss: float
    """Mean language-model loss over this rank's micro-batches (not averaged over ranks)."""
    grad_norm: float
    """Global gradient norm before clipping, every expert counted once (the same on every rank)."""
    outputs: List[Any] = field(default_factory=list)
    """The model outputs of each micro-batch, when asked for (`keep_outputs`)."""


def optimizer_step(engine, model, next_batch: Callable[[], Any], accum: int, device: torch.device,
                   dtype: torch.dtype, before_step: Optional[Callable[[float], None]] = None,
                   keep_outputs: bool = False) -> StepResult:
    """Run one optimizer step. `next_batch()` gives (x, y) on the CPU; `before_step(grad_norm)` is
    called at the boundary while the reduced gradients are still there (ZeRO 0 only: `moe parity
    --dump` reads them)."""
    loss_sum = torch.zeros((), dtype=torch.float64)
    norm = float("nan")
    outputs = []
    zero = engine.zero_optimization_stage()
    for _ in range(accum):
        x, y = next_batch()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = engine(x.to(device), y.to(device))
        engine.backward(out.loss + out.aux_loss)
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary and zero == 0:
            norm = global_grad_norm(engine)
            if before_step is not None:
                before_step(norm)
        engine.step()
        if boundary and zero > 0:
            norm = global_grad_norm(engine)
        if boundary:
            end_optimizer_step(model)
        loss_sum += out.loss.detach().double().cpu() / accum  # (the order moe train has always summed in)
        if keep_outputs:
            outputs.append(out)
    return StepResult(float(loss_sum), norm, outputs)
