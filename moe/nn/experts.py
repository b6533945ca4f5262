"""Expert weights and the grouped expert computation.

All experts of a layer are stored stacked: `w13 [E, 2h, d]` (gate and up projections fused, the same
layout as an nn.Linear weight) and `w2 [E, d, h]`. Rows arrive already sorted by expert, with
`tokens_per_expert` giving the segment lengths. How the E small GEMMs run is a backend chosen by name:

- `loop`: one GEMM per non-empty expert over its contiguous slice (best on CPU, no padding). With the
  extension backend on CPU it runs as one compiled op (`moe.ops.grouped_swiglu`, moe/csrc/experts_cpu.cpp:
  every thread runs single-threaded GEMMs on an equal share of rows, and a fused SwiGLU); the Python
  `_GroupedSwiGLU` below is its reference.
- `padded`: pad every expert to the largest segment and run one batched GEMM (wasted FLOPs, one call).
- `grouped`: `torch._grouped_mm`, one call per projection for all experts, the segment offsets read
  on the device: no host sync. CUTLASS kernels on Hopper-class GPUs in bf16 (`auto` picks it there),
  torch's fallback elsewhere (CPU: fp32, bf16). Rows must be 16-byte multiples: d_model and
  expert_hidden multiples of 8 (checked with the config).

Every backend takes the counts as a tensor; those that need them on the host (`loop`, `padded`) read
them there. torch._grouped_mm is not an autocast op (pytorch#174763), so under autocast `grouped`
casts its operands to the autocast dtype itself, as autocast does for the loop's torch.mm.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe import ops


def swiglu(h13: torch.Tensor) -> torch.Tensor:
    gate, up = h13.chunk(2, dim=-1)
    return F.silu(gate) * up


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


def _loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 0:
        return x.new_zeros(0, w2.shape[1]) + 0 * (w13.sum() + w2.sum())
    return _GroupedSwiGLU.apply(x.contiguous(), w13, w2, counts.tolist())  # one host sync: segment bounds


def _padded(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
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


def _grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    dtype = _autocast_dtype(x.device) or x.dtype
    x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
    if x.shape[0] == 0:  # no rows (an expert-parallel rank may receive none): zero gradients, as `loop`
        return x.new_zeros(0, w2.shape[1]) + 0 * (w13.sum() + w2.sum())
    # int32 end offset of each expert's segment, computed on the device: no host sync
    offs = torch.cumsum(counts.to(x.device), 0, dtype=torch.int32)
    h = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)
    return torch._grouped_mm(swiglu(h), w2.transpose(1, 2), offs=offs)


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast runs matmuls in on this device type, or None when autocast is off."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


EXPERT_IMPLS: Dict[str, Callable] = {"loop": _loop, "padded": _padded, "grouped": _grouped}


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
        return "loop, as one compiled grouped SwiGLU op (moe._C)"
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
        impl = resolve_experts_impl(self.impl, x.device, compute_dtype, self.d_model, self.hidden)
        if impl == "loop" and ops.grouped_swiglu_supported(self.backend, x):
            return ops.grouped_swiglu(x, self.w13, self.w2, tokens_per_expert)
        if impl == "grouped":
            why = grouped_mm_shape_error(self.d_model, self.hidden, compute_dtype)
            if why is not None:
                raise ValueError(f"model.moe.experts_impl=grouped: {why}")
        return EXPERT_IMPLS[impl](x, self.w13, self.w2, tokens_per_expert)


def expert_init_stds(init_std: float, n_layers: int) -> tuple:
    return init_std, init_std / math.sqrt(2 * n_layers)
