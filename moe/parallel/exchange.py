"""The expert-parallel token exchange, as forward pre/post hooks on a layer's experts module (the
torchtitan pattern).

The layer hands its expert-sorted rows and per-expert counts to `experts(rows, counts)` as usual; the
pre-hook exchanges the counts (all_to_all_single of [P, E/P] integers), then the rows
(all_to_all_single with uneven splits: dropless, nothing padded), and regroups the received rows by
local expert; the local experts run; the post-hook restores the received order and sends every row
back (all_to_all_single with the splits reversed). Both exchanges are one autograd Function whose
backward is the reverse exchange, so gradients flow to the sending rank. Every rank runs the same
exchanges in the same order, forward and backward; a rank whose experts received no rows still runs
the backward of its dispatch exchange (`_Tie` keeps it in the graph), or its peers would wait for it.
The split sizes need one host sync per layer; the exchange is not yet overlapped with expert
computation.

Telemetry: each exchange accumulates its wall time (forward and backward, training only; it includes
waiting for the slowest peer of the group) and the rows its rank's experts computed, which
moe/parallel/telemetry.py `ep_metrics` reduces and resets.

Failures: a peer that dies or stops inside an exchange makes the collective here raise a
`CollectiveError` naming this rank, its EP group, the collective and the layer, within
`parallel.timeout_s` (the groups are created with it; gloo raises on it; NCCL's watchdog aborts the
process group on it, with TORCH_NCCL_ASYNC_ERROR_HANDLING at its default). The test-only
MOE_TEST_FAULT (moe/parallel/faults.py) makes a rank die or stop at a given exchange.
"""
from __future__ import annotations

import time
from typing import Callable, List

import torch
from torch import nn

from moe.parallel import faults
from moe.parallel.distributed import CollectiveError
from moe.parallel.groups import ExpertParallelGroups

# torch.distributed is imported in the functions (start-up time of commands that never use it).


def local_expert_order(recv: torch.Tensor) -> torch.Tensor:
    """The received rows come [source rank][local expert] (recv [P, L]: rows from rank p for local
    expert l); the experts need them [local expert][source rank]: the row order that regroups them."""
    P, L = recv.shape
    block = torch.arange(P * L, device=recv.device).repeat_interleave(recv.reshape(-1).to(recv.device))
    src, local = block // L, block % L
    return torch.argsort(local * P + src, stable=True)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


class _Exchange(torch.autograd.Function):
    """all_to_all_single of rows with uneven splits; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, exchange, what):
        ctx.splits = (out_splits, in_splits)
        ctx.exchange, ctx.what = exchange, what
        return exchange.all_to_all(x, out_splits, in_splits, f"{what} (forward)")

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        g = ctx.exchange.all_to_all(grad.contiguous(), in_splits, out_splits, f"{ctx.what} (backward)")
        return g, None, None, None, None


class _Tie(torch.autograd.Function):
    """Identity on `out` that makes it depend on `inp` in autograd (zero gradient). The experts' output
    does not depend on their input when a rank received no rows; without this edge the backward of
    the dispatch exchange would not run on that rank while its peers wait for it in the collective."""

    @staticmethod
    def forward(ctx, out, inp):
        ctx.inp_shape, ctx.inp_dtype = inp.shape, inp.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.inp_shape, dtype=ctx.inp_dtype)


class TokenExchange:
    """Forward pre/post hooks on one layer's experts module that run its experts expert-parallel."""

    def __init__(self, groups: ExpertParallelGroups, num_experts: int, layer_name: str) -> None:
        self.groups = groups
        self.num_experts = num_experts
        self.local_experts = num_experts // groups.ep_size
        self.layer_name = layer_name
        self.exchange_s = 0.0  # wall time inside collectives since the last ep_metrics
        self.rows = 0  # rows this rank's experts computed since the last ep_metrics
        self._pending: List[tuple] = []
        self._counting = True  # telemetry counts training exchanges only (not eval forwards)
        self._fault = faults.exchange_fault()

    def attach(self, experts: nn.Module) -> None:
        experts.register_forward_pre_hook(self.dispatch)
        experts.register_forward_hook(self.combine)

    # --- collectives, timed and named
    def _run(self, what: str, fn: Callable):
        g = self.groups
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CollectiveError(
                f"rank {g.rank} (EP group ranks {g.ep_ranks}): {what} in {self.layer_name} failed after "
                f"{time.perf_counter() - t0:.1f}s (parallel.timeout_s={g.timeout_s:g}); a peer rank is dead or "
                f"stuck [{type(exc).__name__}: {first}]") from exc
        finally:
            if self._counting:
                self.exchange_s += time.perf_counter() - t0

    def all_to_all(self, x: torch.Tensor, out_splits: List[int], in_splits: List[int], what: str) -> torch.Tensor:
        import torch.distributed as dist

        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        group = self.groups.ep_group
        self._run(f"all_to_all_single of {what}",
                  lambda: dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group))
        return out

    # --- hooks
    @torch.compiler.disable  # collectives with host-side split sizes, timing, fault injection: eager
    def dispatch(self, experts: nn.Module, args: tuple):
        import torch.distributed as dist

        rows, counts = args
        P, L = self.groups.ep_size, self.local_experts
        if counts.numel() != self.num_experts:
            raise ValueError(f"{self.layer_name}: expected counts for {self.num_experts} experts, got {counts.numel()}")
        self._counting = experts.training
        faults.maybe_fault(self._fault, self.groups.rank)
        send = counts.detach().to(torch.int64).reshape(P, L).contiguous()
        recv = torch.empty_like(send)
        self._run("all_to_all_single of the per-expert token counts",
                  lambda: dist.all_to_all_single(recv, send, group=self.groups.ep_group))
        in_splits = send.sum(1).tolist()
        out_splits = recv.sum(1).tolist()
        received = _Exchange.apply(rows, out_splits, in_splits, self, "the expert token exchange")
        order = local_expert_order(recv)
        local_counts = recv.sum(0)
        if self._counting:
            self.rows += int(local_counts.sum())
        grouped = received.index_select(0, order.to(received.device))
        self._pending.append((order, in_splits, out_splits, grouped))
        return grouped, local_counts.to(counts.device)

    @torch.compiler.disable
    def combine(self, experts: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        order, in_splits, out_splits, grouped = self._pending.pop()
        if torch.is_grad_enabled() and grouped.requires_grad:
            out = _Tie.apply(out, grouped)
        back = out.index_select(0, inverse_permutation(order).to(out.device))
        return _Exchange.apply(back, in_splits, out_splits, self, "the expert output exchange")
