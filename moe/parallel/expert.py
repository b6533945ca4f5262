"""Expert parallelism (EP), applied to a built model from outside: the model file never sees it.

`apply_expert_parallel(model, ep_size)` turns every MoE layer of a replicated model into an
expert-parallel one, in three steps:

1. Process groups (DeepSpeed's layout, `deepspeed.utils.groups`, name `ep_size_{P}`): the world of W
   ranks is cut into W/P expert-parallel (EP) groups of P consecutive ranks (one node when P fits in
   it), and P expert-data-parallel (EDP) groups of W/P ranks with stride P (rank r holds the same
   experts as r + P, r + 2P, ...). Every rank stays a data-parallel rank for the non-expert weights.
   The groups are created here with the run's `parallel.timeout_s` (DeepSpeed's own `new_group` calls
   would get torch's 30-minute default) and registered in DeepSpeed's group tables.

2. Local experts: the stacked weights w13 [E, 2h, d] and w2 [E, d, h] were initialised in full on
   every rank from the same seed, so EP rank p keeps the slice [p*E/P, (p+1)*E/P) and starts from
   exactly the weights of the EP=1 model. The sliced parameters are marked as DeepSpeed expert
   parameters (`allreduce=False`, `group_name`), and the MoE layer's class is swapped for a subclass
   that also derives from `deepspeed.moe.layer.MoE`, which is how DeepSpeed's engine recognises MoE
   layers (`has_moe_layers`); without it parameters marked `allreduce=False` are silently never
   reduced.

3. The token exchange, as forward pre/post hooks on the experts module (the torchtitan pattern): the
   layer hands its expert-sorted rows and per-expert counts to `experts(rows, counts)` as usual; the
   pre-hook exchanges the counts (all_to_all_single of [P, E/P] integers), then the rows
   (all_to_all_single with uneven splits: dropless, nothing padded), and regroups the received rows
   by local expert; the local experts run; the post-hook restores the received order and sends every
   row back (all_to_all_single with the splits reversed). Both exchanges are one autograd Function
   whose backward is the reverse exchange, so gradients flow to the sending rank. Every rank runs the
   same exchanges in the same order, forward and backward; a rank whose experts received no rows
   still runs the backward of its dispatch exchange (`_Tie` keeps it in the graph), or its peers would
   wait for it. The split sizes need one host sync per layer; the exchange is not yet overlapped with
   expert computation.

Which routers can run expert-parallel: routing happens before the exchange, on each rank's own
micro-batch, exactly as under data parallelism, and the balancing state that needs more than one
micro-batch (aux-loss-free bias, global-batch loss) is reduced over the whole world by
moe/routing/balancing.py; so every router and balancing method of the registry runs unchanged, and
EP=N gives the model of EP=1 at the same world size and micro batch. A router whose decision needs the
tokens of other ranks would declare `supports_expert_parallel = False` (and `expert_parallel_reason`)
and `moe.config.validate` rejects it with ep_size > 1.

Gradient scale (why EP=N is the same model as EP=1). The objective is the mean over the W ranks of
their micro-batch losses. Backward through the exchange gives expert e, on the rank that holds it,
the sum over its EP group's losses of d loss_r / d w_e. DeepSpeed's engine then all-reduces (sums)
expert gradients over the EDP group and divides by the full data-parallel world size W
(`_reduce_expert_gradients`; ZeRO 1/2's `average_tensor` does the same), giving
(1/W) sum over all W ranks of d loss_r / d w_e: the gradient of the objective, exactly as at EP=1.
Averaging over the EDP group only (W/P) would make expert gradients P times too large; the test-only
switch MOE_TEST_EXPERT_GRAD_SCALE reproduces that class of bug so the parity harness can show it
catches it.

Gradient norm and clipping. Each expert's gradient lives on the ranks of one EP position, so the
global norm is sqrt(|g_nonexpert|^2 + sum over the EP group of |g_local_experts|^2): each expert
counted once. ZeRO 1/2 get this right (the squared partition norms are summed over the whole world,
where every (expert, partition) is held by exactly one rank). Without ZeRO, DeepSpeed 0.19 gets it
wrong under EP: fp32 averages the per-rank norms (`runtime/utils.clip_grad_norm_`) and bf16 leaves
expert gradients out of the norm altogether (`FP16_UnfusedOptimizer.step`). `fix_engine_clipping`
replaces both with `clip_grad_norm_` below; `global_grad_norm` is the norm the loop logs.

Telemetry: each exchange accumulates its wall time (forward and backward, training only; it includes
waiting for the slowest peer of the group) and the rows its rank's experts computed; `ep_metrics`
reduces them at a logging step into `ep/exchange_s` (per optimizer step, slowest rank),
`ep/exchange_share` (of the window's wall time) and `ep/rank_token_imbalance` (max / mean rows per
rank).

Failures: a peer that dies or stops inside an exchange makes the collective here raise a
`CollectiveError` naming this rank, its EP group, the collective and the layer, within
`parallel.timeout_s` (the groups are created with it; gloo raises on it; NCCL's watchdog aborts the
process group on it, with TORCH_NCCL_ASYNC_ERROR_HANDLING at its default). Collectives elsewhere
(DeepSpeed's gradient all-reduce, metrics) are named by `moe.parallel.collective_failure`.

Test-only switches: MOE_TEST_EXPERT_GRAD_SCALE=<s> multiplies expert gradients by s under EP;
MOE_TEST_FAULT=exit|hang:<rank>:<n> kills or stops that rank at its n-th token exchange.
"""
from __future__ import annotations

import datetime
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

EXPERT_PARAM_NAMES = ("w13", "w2")


class CollectiveError(RuntimeError):
    """A collective failed or timed out because a peer rank is dead or stuck."""


@dataclass
class ExpertParallelGroups:
    ep_size: int
    ep_rank: int
    ep_group: Any
    ep_ranks: List[int]
    edp_size: int
    edp_rank: int
    edp_group: Any
    edp_ranks: List[int]
    group_name: str
    timeout_s: float
    rank: int
    world_size: int


# ------------------------------------------------------------------------------------------ groups


def create_groups(ep_size: int, timeout_s: Optional[float] = None) -> ExpertParallelGroups:
    """EP groups of consecutive ranks and strided EDP groups (DeepSpeed's legacy E + D layout), created
    with the given timeout and registered in `deepspeed.utils.groups` under `ep_size_{ep_size}`.
    A collective: every rank must call it, in the same order."""
    import torch.distributed as dist
    from deepspeed.utils import groups as ds_groups

    if not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed to be initialised "
                           "(moe.parallel.init_distributed)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"parallel.ep_size ({ep_size}) must divide the world size ({world})")
    name = f"ep_size_{ep_size}"
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    if name not in ds_groups._EXPERT_PARALLEL_GROUP:
        kw = {"timeout": timeout} if timeout is not None else {}
        for i in range(ep_size):  # EDP: ranks holding the same experts
            ranks = list(range(i, world, ep_size))
            group = dist.new_group(ranks, **kw)
            if rank in ranks:
                ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = group
                ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = ranks
        for i in range(world // ep_size):  # EP: ranks that exchange tokens
            ranks = list(range(i * ep_size, (i + 1) * ep_size))
            group = dist.new_group(ranks, **kw)
            if rank in ranks:
                ds_groups._EXPERT_PARALLEL_GROUP[name] = group
                ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = ranks
    ep_ranks = list(ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name])
    edp_ranks = list(ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name])
    return ExpertParallelGroups(
        ep_size=ep_size, ep_rank=ep_ranks.index(rank), ep_group=ds_groups._EXPERT_PARALLEL_GROUP[name],
        ep_ranks=ep_ranks, edp_size=len(edp_ranks), edp_rank=edp_ranks.index(rank),
        edp_group=ds_groups._EXPERT_DATA_PARALLEL_GROUP[name], edp_ranks=edp_ranks, group_name=name,
        timeout_s=float(timeout_s or 0), rank=rank, world_size=world)


# ---------------------------------------------------------------------------------- expert slicing


def expert_layout(experts: nn.Module) -> tuple:
    """(first global expert id, local experts, global experts) of an Experts module."""
    local = experts.w13.shape[0]
    return getattr(experts, "ep_offset", 0), local, getattr(experts, "ep_global_experts", local)


def is_expert_param(p: torch.Tensor) -> bool:
    """DeepSpeed's definition (deepspeed.moe.utils.is_moe_param)."""
    return hasattr(p, "allreduce") and not p.allreduce


def shard_experts(experts: nn.Module, groups: ExpertParallelGroups) -> None:
    """Keep this EP rank's slice of the stacked expert weights and mark them as expert parameters."""
    E = experts.w13.shape[0]
    L = E // groups.ep_size
    start = groups.ep_rank * L
    for name in EXPERT_PARAM_NAMES:
        full = getattr(experts, name)
        local = nn.Parameter(full.detach()[start:start + L].clone(), requires_grad=full.requires_grad)
        local.allreduce = False
        local.group_name = groups.group_name
        setattr(experts, name, local)
    experts.num_experts = L
    experts.ep_offset = start
    experts.ep_global_experts = E


# ------------------------------------------------------------------------------------ the exchange


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
        self._fault = _test_fault()

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
        self._maybe_fault()
        send = counts.detach().to(torch.int64).reshape(P, L).contiguous()
        recv = torch.empty_like(send)
        self._run("all_to_all_single of the per-expert token counts",
                  lambda: dist.all_to_all_single(recv, send, group=self.groups.ep_group))
        in_splits = send.sum(1).tolist()
        out_splits = recv.sum(1).tolist()
        received = _Exchange.apply(rows, out_splits, in_splits, self, "the expert token exchange")
        # received is [source rank][local expert]; the experts need [local expert][source rank]
        block = torch.arange(P * L, device=recv.device).repeat_interleave(recv.reshape(-1).to(recv.device))
        src, local = block // L, block % L
        order = torch.argsort(local * P + src, stable=True)
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
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        back = out.index_select(0, inverse.to(out.device))
        return _Exchange.apply(back, in_splits, out_splits, self, "the expert output exchange")

    # --- test-only fault injection: MOE_TEST_FAULT=exit|hang:RANK:CALL
    def _maybe_fault(self) -> None:
        if self._fault is None:
            return
        mode, rank, call = self._fault
        _FAULT_CALLS[0] += 1
        if rank == self.groups.rank and _FAULT_CALLS[0] == call:
            print(f"[moe test] MOE_TEST_FAULT: rank {rank} {'dies' if mode == 'exit' else 'stops'} at token "
                  f"exchange {call}", flush=True)
            if mode == "exit":
                os.kill(os.getpid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGSTOP)


_FAULT_CALLS = [0]


def _test_fault() -> Optional[tuple]:
    spec = os.environ.get("MOE_TEST_FAULT")
    if not spec:
        return None
    mode, rank, call = spec.split(":")
    if mode not in ("exit", "hang"):
        raise ValueError(f"MOE_TEST_FAULT={spec!r}: expected exit|hang:RANK:CALL")
    return mode, int(rank), int(call)


# ------------------------------------------------------------------------------ DeepSpeed adapter

_ADAPTED: Dict[type, type] = {}


def adapt_for_deepspeed(layer: nn.Module) -> None:
    """Make `isinstance(layer, deepspeed.moe.layer.MoE)` hold, so the engine sets `has_moe_layers` and
    reduces expert gradients over the expert-data-parallel groups. Only the class changes: no state,
    parameter name or forward changes. DeepSpeed's MoE.set_deepspeed_parallelism (which would create
    groups for its own expert module) becomes a no-op: create_groups made ours."""
    from deepspeed.moe.layer import MoE

    cls = type(layer)
    if isinstance(layer, MoE):
        return
    if cls not in _ADAPTED:
        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            return None

        _ADAPTED[cls] = type(f"DeepSpeed{cls.__name__}", (cls, MoE), {
            "set_deepspeed_parallelism": set_deepspeed_parallelism,
            "forward": cls.forward,
            "__module__": __name__,
            "__doc__": f"{cls.__name__} recognised by DeepSpeed as an MoE layer (see moe.parallel.expert)."})
    layer.__class__ = _ADAPTED[cls]


# ---------------------------------------------------------------------------------------- applying


def moe_layers(model: nn.Module) -> List[nn.Module]:
    from moe.nn.moe_layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


def check_supported(model: nn.Module, ep_size: int) -> None:
    """Raise ValueError for MoE layers that cannot be split over ep_size ranks."""
    for layer in moe_layers(model):
        E = layer.num_experts
        if E % ep_size:
            raise ValueError(f"parallel.ep_size ({ep_size}) must divide model.moe.num_experts ({E})")
        if not getattr(layer.router, "supports_expert_parallel", True):
            raise ValueError(f"model.moe.router={layer.cfg.router} cannot run expert-parallel "
                             f"(parallel.ep_size={ep_size}): {getattr(layer.router, 'expert_parallel_reason', '')}")


def apply_expert_parallel(model: nn.Module, ep_size: int, timeout_s: Optional[float] = None
                          ) -> Optional[ExpertParallelGroups]:
    """Shard every MoE layer's experts over EP groups of ep_size ranks (see the module docstring).
    Call after the model is built (same seed on every rank) and before the optimizer and the
    DeepSpeed engine. ep_size=1 changes nothing and returns None."""
    layers = moe_layers(model)
    if ep_size <= 1 or not layers:
        return None
    check_supported(model, ep_size)
    groups = create_groups(ep_size, timeout_s)
    names = {id(m): n for n, m in model.named_modules()}
    for layer in layers:
        shard_experts(layer.experts, groups)
        exchange = TokenExchange(groups, layer.num_experts, names.get(id(layer), "an MoE layer"))
        exchange.attach(layer.experts)
        layer.experts.token_exchange = exchange
        adapt_for_deepspeed(layer)
    scale = float(os.environ.get("MOE_TEST_EXPERT_GRAD_SCALE", "1") or 1)
    if scale != 1.0:  # test-only: reproduce the mis-scaled expert gradient bug class
        for layer in layers:
            for name in EXPERT_PARAM_NAMES:
                getattr(layer.experts, name).register_hook(lambda g, s=scale: g * s)
    return groups


def model_groups(model: nn.Module) -> Optional[ExpertParallelGroups]:
    for layer in moe_layers(model):
        ex = getattr(layer.experts, "token_exchange", None)
        if ex is not None:
            return ex.groups
    return None


# ------------------------------------------------------------------------------ norm and clipping


def _expert_group(p: torch.Tensor):
    from deepspeed.utils import groups as ds_groups

    return ds_groups._get_expert_parallel_group(p.group_name)


@torch.no_grad()
def global_grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of the full model's gradient, every expert counted once. Call on every rank after the
    gradients were reduced (non-expert ones over data parallel, expert ones over EDP) and before they
    are clipped; a collective over the EP groups when there are expert parameters."""
    import torch.distributed as dist

    params = list(params)
    dense = [p.grad.detach().float().norm() ** 2 for p in params if p.grad is not None and not is_expert_param(p)]
    total = torch.stack(dense).sum() if dense else torch.zeros(())
    by_group: Dict[str, List[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None and is_expert_param(p):
            by_group.setdefault(p.group_name, []).append(p.grad.detach().float().norm() ** 2)
    for name in sorted(by_group):
        sq = torch.stack(by_group[name]).sum().to(total.device)
        group = _expert_group(next(p for p in params if is_expert_param(p) and p.group_name == name))
        dist.all_reduce(sq, group=group)
        total = total + sq.to(total.device)
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """DeepSpeed's clipping rule (coefficient min(1, max_norm / (norm + 1e-6))) on the EP-correct norm."""
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
    return norm


def fix_engine_clipping(engine) -> None:
    """Without ZeRO, DeepSpeed's clipping is wrong under EP (see the module docstring): route it
    through clip_grad_norm_. ZeRO 1/2 compute the norm correctly and are left alone."""
    if engine.zero_optimization_stage() > 0 or engine.gradient_clipping() <= 0:
        return
    max_norm = engine.gradient_clipping()
    opt = engine.optimizer
    if hasattr(opt, "clip_grad") and hasattr(opt, "fp16_groups"):
        # bf16/fp16 wrapper (FP16_UnfusedOptimizer / FP16_Optimizer): its norm leaves experts out.
        # Clip the low-precision gradients here and let it copy them to fp32 unclipped.
        original_step = opt.step
        opt.clip_grad = 0.0

        def step(*args, **kwargs):
            scale = float(getattr(getattr(opt, "loss_scale_config", None), "cur_scale", 1.0) or 1.0)
            params = [p for g in opt.fp16_groups for p in g]
            norm = global_grad_norm(params) / scale
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.dtype))
            result = original_step(*args, **kwargs)
            opt._global_grad_norm = float(norm)
            return result

        opt.step = step
        return

    def clip_fp32_gradients():
        engine._global_grad_norm = float(clip_grad_norm_(list(engine.module.parameters()), max_norm))

    engine.clip_fp32_gradients = clip_fp32_gradients


# -------------------------------------------------------------------------------------- telemetry


def exchanges(model: nn.Module) -> List[TokenExchange]:
    return [layer.experts.token_exchange for layer in moe_layers(model)
            if getattr(layer.experts, "token_exchange", None) is not None]


def ep_metrics(model: nn.Module, steps: int, window_s: float) -> Dict[str, float]:
    """Exchange time and token imbalance since the last call, over `steps` optimizer steps lasting
    `window_s` seconds. A collective (two all-reduces over the world) when EP is on: call on every
    rank. Keys: `ep/exchange_s` (exchange seconds per step, slowest rank), `ep/exchange_share`
    (of the window's wall time), `ep/rank_token_imbalance` (max / mean expert rows per rank; 1 is
    perfect balance), `ep/rows_per_rank_max`."""
    import torch.distributed as dist

    ex = exchanges(model)
    if not ex:
        return {}
    seconds = sum(e.exchange_s for e in ex)
    rows = float(sum(e.rows for e in ex))
    for e in ex:
        e.exchange_s, e.rows = 0.0, 0
    mx = torch.tensor([seconds, rows], dtype=torch.float64)
    sm = torch.tensor([rows], dtype=torch.float64)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    dist.all_reduce(sm)
    mean_rows = float(sm) / dist.get_world_size()
    steps = max(steps, 1)
    return {"ep/exchange_s": float(mx[0]) / steps,
            "ep/exchange_share": float(mx[0]) / window_s if window_s > 0 else 0.0,
            "ep/rank_token_imbalance": float(mx[1]) / mean_rows if mean_rows > 0 else 1.0,
            "ep/rows_per_rank_max": float(mx[1]) / steps}


# ------------------------------------------------------------------------------------ gathering


def gather_experts(tensor: torch.Tensor, groups: Optional[ExpertParallelGroups]) -> torch.Tensor:
    """The full [E, ...] tensor from each EP rank's [E/P, ...] slice (a collective over the EP group)."""
    import torch.distributed as dist

    if groups is None or groups.ep_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(groups.ep_size)]
    dist.all_gather(parts, tensor.contiguous(), group=groups.ep_group)
    return torch.cat(parts, dim=0)
