"""Expert weights and the grouped expert computation: a registry of expert backends.

All experts of a layer are stored stacked: `w13 [E, 2h, d]` (gate and up projections fused, the same
layout as an nn.Linear weight) and `w2 [E, d, h]`. Rows arrive already sorted by expert, with
`tokens_per_expert` giving the segment lengths. How the E small GEMMs run is a backend, chosen by
name (`model.moe.experts_impl`) from EXPERT_IMPLS, name -> class. Every backend is a stateless
ExpertBackend subclass with the same two static methods:

- `forward(x [N, d], w13, w2, counts [E] tensor, dispatch="reference") -> [N, d]`, differentiable;
  `dispatch` is the layer's dispatch backend (moe.ops), which `loop` uses on CPU;
- `shape_error(d_model, hidden, dtype) -> Optional[str]`: why it cannot run such experts (None: it can).

The backends:
- `loop`: one GEMM per non-empty expert over its contiguous slice (best on CPU, no padding). With the
  extension backend on CPU it runs as one compiled op (`moe.ops.grouped_swiglu`, moe/csrc/experts_cpu.cpp:
  every thread runs single-threaded GEMMs on an equal share of rows, and a fused SwiGLU); the Python
  `_GroupedSwiGLU` below is its reference. There `Experts.forward_routed` also takes the permute and
  the weighted combine into one op (`moe.ops.routed_swiglu`), from token rows to token rows.
- `padded`: pad every expert to the largest segment and run one batched GEMM (wasted FLOPs, one call).
- `grouped`: `torch._grouped_mm`, one call per projection for all experts, the segment offsets read
  on the device: no host sync. CUTLASS kernels on Hopper-class GPUs in bf16 (`auto` picks it there),
  torch's fallback elsewhere (CPU: fp32, bf16). Rows must be 16-byte multiples: d_model and
  expert_hidden multiples of 8 (checked with the config).

Every backend takes the counts as a tensor; those that need them on the host (`loop`, `padded`) read
them there. torch._grouped_mm is not an autocast op (pytorch#174763), so under autocast `grouped`
casts its operands to the autocast dtype itself, as autocast does for the loop's torch.mm.

`check_config` (at the end) checks a config's `model.moe.experts_impl` against this registry.
"""
from __future__ import annotations

import os
from typing import ClassVar, Dict, Optional, Type

import torch
import torch.nn.functional as F
from torch import nn

from moe import ops
from moe.config import ModelConfig, expert_hidden
from moe.errors import ConfigError
from moe.nn.ffn import swiglu


class _GroupedSwiGLU(torch.autograd.Function):
    """E SwiGLU FFNs over contiguous row segments, one GEMM per non-empty expert.

    Hand-written backward: every GEMM writes straight into preallocated activation and gradient
    buffers (`out=`), so there is no per-expert slicing of the stacked weights in autograd (which
    would zero-fill and accumulate a full-size gradient per expert) and no cat/stack of the results.
    """

    @staticmethod
    def forward(ctx, x, w13, w2, counts):
        n, d = x.shape
        h = w2.shape[2]
        h13 = x.new_empty(n, 2 * h)
        act = x.new_empty(n, h)
        out = x.new_empty(n, d)
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            rows = slice(start, start + c)
            torch.mm(x[rows], w13[e].t(), out=h13[rows])
            start += c
        gate, up = h13[:, :h], h13[:, h:]
        torch.mul(F.silu(gate), up, out=act)
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            rows = slice(start, start + c)
            torch.mm(act[rows], w2[e].t(), out=out[rows])
            start += c
        ctx.counts = counts
        ctx.save_for_backward(x, w13, w2, h13, act)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w13, w2, h13, act = ctx.saved_tensors
        counts = ctx.counts
        grad_out = grad_out.contiguous()
        h = w2.shape[2]
        grad_act = torch.empty_like(act)
        grad_w2 = torch.empty_like(w2)
        grad_w13 = torch.empty_like(w13)
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                grad_w2[e].zero_()
                continue
            rows = slice(start, start + c)
            torch.mm(grad_out[rows], w2[e], out=grad_act[rows])
            torch.mm(grad_out[rows].t(), act[rows], out=grad_w2[e])
            start += c
        gate, up = h13[:, :h], h13[:, h:]
        grad_h13 = torch.empty_like(h13)
        torch.mul(grad_act, F.silu(gate), out=grad_h13[:, h:])  # d up = g * silu(gate)
        # d gate = silu'(gate) * g * up, with aten's fused silu backward
        torch.ops.aten.silu_backward.grad_input(grad_act * up, gate, grad_input=grad_h13[:, :h])
        grad_x = torch.empty_like(x)
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                grad_w13[e].zero_()
                continue
            rows = slice(start, start + c)
            torch.mm(grad_h13[rows], w13[e], out=grad_x[rows])
            torch.mm(grad_h13[rows].t(), x[rows], out=grad_w13[e])
            start += c
        return grad_x, grad_w13, grad_w2, None


def _no_rows(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The [0, d] output for no rows (an expert-parallel rank may receive none), with zero (not
    missing) gradients for the weights."""
    return x.new_zeros(0, w2.shape[1]) + 0 * (w13.sum() + w2.sum())


GROUPED_MM_ALIGN_BYTES = 16  # torch._grouped_mm: every row stride a multiple of 16 bytes


def grouped_mm_shape_error(d_model: int, hidden: int, dtype: torch.dtype) -> Optional[str]:
    """Why torch._grouped_mm cannot run these experts in `dtype` (None when it can)."""
    if not hasattr(torch, "_grouped_mm"):
        return f"this torch ({torch.__version__}) has no torch._grouped_mm"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"torch._grouped_mm takes float32, bfloat16 or float16, not {dtype}"
    size = dtype.itemsize
    for name, n in (("d_model", d_model), ("expert_hidden", hidden)):
        if n * size % GROUPED_MM_ALIGN_BYTES:
            return (f"torch._grouped_mm needs rows of a multiple of {GROUPED_MM_ALIGN_BYTES} bytes: {name}={n} in "
                    f"{dtype} is {n * size} bytes (use a multiple of {GROUPED_MM_ALIGN_BYTES // size})")
    return None


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast runs matmuls in on this device type, or None when autocast is off."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


# ------------------------------------------------------------------------------------ the backends


class ExpertBackend:
    """One way to run E SwiGLU FFNs over expert-sorted rows. Stateless: EXPERT_IMPLS maps `name` to
    the class, and its static methods are called on the class."""

    name: ClassVar[str] = ""

    @staticmethod
    def shape_error(d_model: int, hidden: int, dtype: torch.dtype) -> Optional[str]:
        """Why this backend cannot run experts of these shapes in `dtype` (None when it can)."""
        return None

    @staticmethod
    def forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor,
                dispatch: str = "reference") -> torch.Tensor:
        """x [N, d] sorted by expert, expert e taking the next counts[e] rows; w13 [E, 2h, d], w2 [E, d, h]
        -> [N, d]. dispatch: the layer's dispatch backend (moe.ops)."""
        raise NotImplementedError


class LoopExperts(ExpertBackend):
    """`loop`: one GEMM per non-empty expert (`_GroupedSwiGLU`); compiled (moe._C) with the extension
    dispatch backend on CPU."""

    name = "loop"

    @staticmethod
    def forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor,
                dispatch: str = "reference") -> torch.Tensor:
        if ops.grouped_swiglu_supported(dispatch, x):
            return ops.grouped_swiglu(x, w13, w2, counts)
        if x.shape[0] == 0:
            return _no_rows(x, w13, w2)
        return _GroupedSwiGLU.apply(x.contiguous(), w13, w2, counts.tolist())  # one host sync: segment bounds


class PaddedExperts(ExpertBackend):
    """`padded`: every expert padded to the largest segment, one batched GEMM per projection."""

    name = "padded"

    @staticmethod
    def forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor,
                dispatch: str = "reference") -> torch.Tensor:
        E, d = w13.shape[0], x.shape[1]
        counts_t = counts.to(device=x.device, dtype=torch.long)
        cap = max(int(counts_t.max()), 1)  # host sync: the padded shape
        offsets = torch.cumsum(counts_t, 0) - counts_t
        slot = torch.arange(cap, device=x.device)
        valid = slot.unsqueeze(0) < counts_t.unsqueeze(1)  # [E, cap]
        rows = (offsets.unsqueeze(1) + slot.unsqueeze(0))[valid]  # source row of each valid slot
        padded = x.new_zeros(E * cap, d)
        flat_valid = valid.reshape(-1)
        padded = padded.index_copy(0, flat_valid.nonzero().squeeze(1), x.index_select(0, rows))
        h = torch.bmm(padded.view(E, cap, d), w13.transpose(1, 2))
        y = torch.bmm(swiglu(h), w2.transpose(1, 2)).reshape(E * cap, -1)
        return y[flat_valid]


class GroupedExperts(ExpertBackend):
    """`grouped`: torch._grouped_mm, one call per projection for all experts, no host sync."""

    name = "grouped"

    @staticmethod
    def shape_error(d_model: int, hidden: int, dtype: torch.dtype) -> Optional[str]:
        return grouped_mm_shape_error(d_model, hidden, dtype)

    @staticmethod
    def forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor,
                dispatch: str = "reference") -> torch.Tensor:
        dtype = _autocast_dtype(x.device) or x.dtype
        x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
        if x.shape[0] == 0:  # no rows: zero gradients, as `loop`
            return _no_rows(x, w13, w2)
        # int32 end offset of each expert's segment, computed on the device: no host sync
        offs = torch.cumsum(counts.to(x.device), 0, dtype=torch.int32)
        h = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)
        return torch._grouped_mm(swiglu(h), w2.transpose(1, 2), offs=offs)


EXPERT_IMPLS: Dict[str, Type[ExpertBackend]] = {b.name: b for b in (LoopExperts, PaddedExperts, GroupedExperts)}


# ------------------------------------------------------------------------------------ choosing one


def resolve_experts_impl(name: str, device: torch.device, dtype: torch.dtype, d_model: int, hidden: int) -> str:
    """The backend `name` names; `auto`: `grouped` on CUDA in bf16 (the dtype the GEMMs run in: the
    autocast dtype when autocast is on) when the shapes allow it, else `loop`."""
    if name != "auto":
        return name
    if device.type == "cuda" and dtype == torch.bfloat16 and grouped_mm_shape_error(d_model, hidden, dtype) is None:
        return "grouped"
    return "loop"


def describe_auto_impl(device: torch.device, backend: str) -> str:
    """What `experts_impl=auto` runs on this device (for `moe info`), with dispatch backend `backend`."""
    if device.type == "cuda":
        grouped = ("grouped (torch._grouped_mm)" if hasattr(torch, "_grouped_mm")
                   else f"loop (torch {torch.__version__} lacks _grouped_mm)")
        return f"{grouped} in bf16 (autocast included), loop (a GEMM per expert) otherwise"
    if ops.grouped_swiglu_supported(backend, torch.empty(0, device=device)):
        if ops.cpu_expert_gemm() == "own":
            gemm = "its own, AVX2 + FMA; MOE_CPU_GEMM=aten for ATen's"
        elif os.environ.get("MOE_CPU_GEMM") == "aten":
            gemm = "ATen's, by MOE_CPU_GEMM=aten"
        elif ops.cpu_has_avx512():
            gemm = "ATen's, as this CPU has AVX-512; MOE_CPU_GEMM=own for the AVX2 one"
        else:
            gemm = "ATen's"
        return f"loop, as one compiled grouped SwiGLU op (moe._C; fp32 GEMM: {gemm})"
    return "loop (a GEMM per expert; the compiled grouped SwiGLU needs moe._C)"


class Experts(nn.Module):
    """E SwiGLU FFNs of hidden size h, computed over expert-sorted rows."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, init_std: float, out_std: float,
                 impl: str = "auto", backend: str = "reference") -> None:
        super().__init__()
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.impl = impl
        self.backend = backend  # dispatch backend (moe.ops): "extension" runs `loop` compiled on CPU
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * hidden, d_model))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        nn.init.normal_(self.w13, std=init_std)
        nn.init.normal_(self.w2, std=out_std)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        compute_dtype = _autocast_dtype(x.device) or x.dtype
        impl = EXPERT_IMPLS[resolve_experts_impl(self.impl, x.device, compute_dtype, self.d_model, self.hidden)]
        why = impl.shape_error(self.d_model, self.hidden, compute_dtype)
        if why is not None:
            raise ValueError(f"model.moe.experts_impl={impl.name}: {why}")
        return impl.forward(x, self.w13, self.w2, tokens_per_expert, self.backend)

    def forward_routed(self, tokens: torch.Tensor, index, gate_weights: torch.Tensor) -> Optional[torch.Tensor]:
        """The whole routed computation from tokens to tokens, `unpermute(forward(permute(tokens, index)),
        index, gate_weights)`, where `forward` would run the compiled `loop` (extension backend, CPU): one
        compiled op (moe.ops.routed_swiglu) that gathers each expert's rows itself and adds its outputs,
        times their gates, into the tokens' rows, so neither the permuted rows nor the expert outputs
        are made or saved. tokens [T, d], index a moe.ops.RoutingIndex with E experts, gate_weights
        [T, k] -> [T, d]. None (the caller permutes, calls `forward` and unpermutes) elsewhere, and while
        hooks wrap `forward` (the expert-parallel exchange)."""
        if self._forward_hooks or self._forward_pre_hooks:
            return None
        compute_dtype = _autocast_dtype(tokens.device) or tokens.dtype
        if compute_dtype != tokens.dtype or not ops.grouped_swiglu_supported(self.backend, tokens):
            return None
        impl = resolve_experts_impl(self.impl, tokens.device, compute_dtype, self.d_model, self.hidden)
        if impl != LoopExperts.name or index.tokens_per_expert.numel() != self.num_experts:
            return None
        return ops.routed_swiglu(tokens, index, gate_weights, self.w13, self.w2)


# ------------------------------------------------------------------------------ checking a config

def check_config(model_cfg: ModelConfig) -> None:
    """The expert-backend knob of a config, for moe.validate: `model.moe.experts_impl` is `auto` or a
    name of EXPERT_IMPLS, and the backend it names can run experts of the config's shapes in bf16 (the
    strictest dtype one runs in: `grouped` needs rows of whole 16-byte units), and the ops' environment
    switches (ops.check_environment: MOE_CPU_GEMM=..., a MoeError naming the variable). A dense model
    has nothing to check. Raises a one-line ConfigError naming the key."""
    moe = model_cfg.moe
    if moe.num_experts == 0:
        return
    ops.check_environment()
    if moe.experts_impl == "auto":
        return
    if moe.experts_impl not in EXPERT_IMPLS:
        raise ConfigError(f"model.moe.experts_impl: unknown {moe.experts_impl!r}; "
                          f"known: auto, {', '.join(sorted(EXPERT_IMPLS))}")
    why = EXPERT_IMPLS[moe.experts_impl].shape_error(model_cfg.d_model, expert_hidden(model_cfg), torch.bfloat16)
    if why is not None:
        raise ConfigError(f"model.moe.experts_impl={moe.experts_impl}: {why}")
