"""Test-only switches of expert parallelism, read from the environment; unset, they change nothing.

MOE_TEST_EXPERT_GRAD_SCALE=<s> multiplies expert gradients by s under EP: it reproduces the class of
bug where expert gradients are averaged over the expert-data-parallel group only (P times too large),
so the parity harness can show it catches it (tests/integration/test_expert_parallel.py).
MOE_TEST_FAULT=exit|hang:<rank>:<n> kills (SIGKILL) or stops (SIGSTOP) that rank at its n-th token
exchange, counted over all layers of the process: the dead- or stuck-peer tests.
"""
from __future__ import annotations

import os
import signal
from typing import Iterable, Optional, Sequence, Tuple

from torch import nn

Fault = Tuple[str, int, int]
"""(mode "exit" or "hang", rank, n-th exchange)."""

_FAULT_CALLS = [0]  # token exchanges run by this process (counted only while MOE_TEST_FAULT is set)


def exchange_fault() -> Optional[Fault]:
    """MOE_TEST_FAULT, parsed; None when unset. Raises ValueError for a malformed one."""
    spec = os.environ.get("MOE_TEST_FAULT")
    if not spec:
        return None
    mode, rank, call = spec.split(":")
    if mode not in ("exit", "hang"):
        raise ValueError(f"MOE_TEST_FAULT={spec!r}: expected exit|hang:RANK:CALL")
    return mode, int(rank), int(call)


def maybe_fault(fault: Optional[Fault], rank: int) -> None:
    """Called by every token exchange before its first collective: dies or stops when `fault` names
    this rank and this exchange."""
    if fault is None:
        return
    mode, fault_rank, call = fault
    _FAULT_CALLS[0] += 1
    if fault_rank == rank and _FAULT_CALLS[0] == call:
        print(f"[moe test] MOE_TEST_FAULT: rank {fault_rank} {'dies' if mode == 'exit' else 'stops'} at token "
              f"exchange {call}", flush=True)
        if mode == "exit":
            os.kill(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGSTOP)


def expert_grad_scale() -> float:
    """MOE_TEST_EXPERT_GRAD_SCALE (1 when unset or empty)."""
    return float(os.environ.get("MOE_TEST_EXPERT_GRAD_SCALE", "1") or 1)


def scale_expert_gradients(experts: Iterable[nn.Module], names: Sequence[str]) -> None:
    """Under MOE_TEST_EXPERT_GRAD_SCALE != 1, hook the parameters `names` of each experts module to
    multiply their gradients by it."""
    scale = expert_grad_scale()
    if scale == 1.0:
        return
    for module in experts:
        for name in names:
            getattr(module, name).register_hook(lambda g, s=scale: g * s)
