"""Token dispatch ops: route (token, slot) pairs into an expert-contiguous buffer and back.

Three ops, each differentiable:
- `build_routing_index(expert_indices[T, k], num_experts, capacity, priority)` -> RoutingIndex:
  per-expert kept counts and, for each (token, slot), its row in the expert-sorted buffer (-1 when
  dropped). Within an expert, rows are in token order (stable), so results are deterministic.
- `permute(x[T, d], index)` -> [rows, d]: gather token rows into expert order (dropped slots skipped).
- `unpermute(y[rows, d], index, gate_weights[T, k])` -> [T, d]: each token's weighted sum of its
  expert outputs; dropped slots contribute zero (the residual path carries the token unchanged).
Plus `grouped_swiglu`, the compiled grouped expert FFN (CPU), and `routed_swiglu`, permute + experts +
unpermute in one compiled op (CPU), both used by moe/nn/experts.py, and
`topk_indices`, the routers' top-k selection (compiled on CPU, torch.topk elsewhere).

Each takes `backend`: "reference" (reference.py, pure PyTorch: always importable, and what tests
compare against) or "extension" (extension.py: the compiled moe._C, with its fake kernels and
autograd registered with torch.library); `dispatch_backend()` resolves `auto`. Tensors on a device
the build has no kernels for (e.g. CUDA with a CPU-only build) fall back to the reference with a
warning. Host syncs: when nothing can be dropped the CUDA kernel (and the reference) never wait for
the device, so a dropless layer can be captured in a CUDA graph, and an expert index outside [0, E)
is reported by a device-side assert; a capacity that can drop syncs once for the size.

CPU kernels are built for the baseline ISA and for AVX2+F16C (picked at run time; MOE_CPU_ISA=base
forces the baseline; both give bitwise identical results); MOE_NO_THP_HINT=1 turns off the
transparent-huge-page hint on large fresh outputs. The AVX2 build also has its own fp32 GEMM for the
expert ops (FMA; it reads token rows in place and adds the gated outputs into the tokens' rows):
results equal ATen's GEMM within fp32 rounding, not bitwise. It is the default on CPUs without AVX-512;
on CPUs with AVX-512 ATen's (MKL's 16-lane FMAs) is; MOE_CPU_GEMM=own|aten chooses. `check_environment`
rejects a value of these switches that they do not know.
See moe/csrc/ and benchmarks/dispatch.py.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch

from moe.ops.extension import (_extension_devices, _load_extension, check_environment, extension_available,
                               extension_devices, load_error)
from moe.ops.reference import (RoutingIndex, build_routing_index_reference, expert_counts, permute_reference,
                               unpermute_reference)

__all__ = [
    "RoutingIndex", "build_routing_index", "build_routing_index_reference", "check_environment",
    "dispatch_backend", "expert_capacity", "cpu_expert_gemm", "cpu_has_avx512", "expert_counts",
    "extension_available", "extension_devices", "grouped_swiglu", "grouped_swiglu_supported",
    "permute", "permute_reference", "routed_swiglu", "topk_indices", "unpermute", "unpermute_reference",
]

_WARNED_DEVICES: set = set()


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float,
                    min_capacity: int) -> Optional[int]:
    """Per-expert capacity, or None for dropless (capacity_factor == 0)."""
    if capacity_factor <= 0:
        return None
    return max(min_capacity, int(math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


# ------------------------------------------------------------------------------------ backend choice


def dispatch_backend(requested: str = "auto") -> str:
    """Resolve `auto|extension|reference` to the backend that will run. MOE_DISPATCH overrides."""
    forced = os.environ.get("MOE_DISPATCH")
    if forced:
        requested = forced
    if requested == "reference":
        return "reference"
    if requested == "extension":
        if not extension_available():
            raise RuntimeError("model.moe.dispatch=extension but the compiled extension moe._C is not "
                               f"built ({load_error()!r}); reinstall with `make install` or use dispatch=reference")
        return "extension"
    return "extension" if extension_available() else "reference"


def _use_extension(backend: str, t: torch.Tensor) -> bool:
    if backend == "reference":
        return False
    if backend == "auto":
        if dispatch_backend("auto") == "reference":
            return False
    elif backend != "extension":
        raise ValueError(f"dispatch backend must be 'reference', 'extension' or 'auto', got {backend!r}")
    devices = _extension_devices()
    if not devices:
        raise RuntimeError("dispatch backend 'extension' requested but the compiled extension moe._C is not "
                           f"built ({load_error()!r}); reinstall with `make install` or use dispatch=reference")
    dev = t.device.type
    if dev in devices.split(","):
        return True
    if dev not in _WARNED_DEVICES:
        _WARNED_DEVICES.add(dev)
        warnings.warn(f"moe._C has no {dev} kernels (it has: {devices}); token dispatch on {dev} uses the "
                      "PyTorch reference", RuntimeWarning, stacklevel=3)
    return False


# ------------------------------------------------------------------------------------ the public ops


def build_routing_index(expert_indices: torch.Tensor, num_experts: int, capacity: Optional[int] = None,
                        priority: Optional[torch.Tensor] = None, backend: str = "reference") -> RoutingIndex:
    if _use_extension(backend, expert_indices):
        if priority is not None:
            priority = priority.detach()
        tokens_per_expert, dest_rows, source_tokens = torch.ops.moe.routing_index(
            expert_indices, num_experts, capacity, priority)
        num_rows = source_tokens.shape[0]
        return RoutingIndex(tokens_per_expert=tokens_per_expert, dest_rows=dest_rows, source_tokens=source_tokens,
                            num_rows=num_rows, num_dropped=expert_indices.numel() - num_rows)
    return build_routing_index_reference(expert_indices, num_experts, capacity, priority)


def permute(x: torch.Tensor, index: RoutingIndex, backend: str = "reference") -> torch.Tensor:
    if _use_extension(backend, x):
        return torch.ops.moe.permute(x, index.dest_rows, index.num_rows)
    return permute_reference(x, index)


def unpermute(y: torch.Tensor, index: RoutingIndex, gate_weights: torch.Tensor,
              backend: str = "reference") -> torch.Tensor:
    if _use_extension(backend, y):
        return torch.ops.moe.unpermute(y, index.dest_rows, gate_weights)
    return unpermute_reference(y, index, gate_weights)


def grouped_swiglu_supported(backend: str, x: torch.Tensor) -> bool:
    """True when `grouped_swiglu` runs compiled for x: extension backend, CPU tensor (it has no CUDA
    kernel; on GPUs the experts use torch._grouped_mm or the per-expert loop)."""
    return x.device.type in ("cpu", "meta") and _use_extension(backend, x)


def cpu_expert_gemm() -> str:
    """The GEMM of the compiled fp32 expert ops on CPU: "own" (the AVX2 build's, FMA; the default on
    CPUs without AVX-512, or MOE_CPU_GEMM=own) or "aten" (a CPU with AVX-512, MOE_CPU_GEMM=aten, the
    baseline build, or no extension)."""
    return _load_extension().cpu_gemm() if extension_available() else "aten"


def cpu_has_avx512() -> bool:
    """Whether this CPU has AVX-512F, as the extension sees it (False without the extension)."""
    return bool(_load_extension().cpu_has_avx512f()) if extension_available() else False


def grouped_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The compiled grouped expert SwiGLU (moe._C, CPU): E SwiGLU FFNs over expert-sorted rows x [N, d],
    expert e taking the next counts[e] rows; w13 [E, 2h, d], w2 [E, d, h] -> [N, d]. The reference is
    the `loop` expert backend of moe.nn.experts (same math, one multi-threaded GEMM per expert); check
    `grouped_swiglu_supported` first. counts stays a tensor: no host list is built."""
    _load_extension()
    return torch.ops.moe.grouped_swiglu(x, w13, w2, counts)[0]


def routed_swiglu(x: torch.Tensor, index: RoutingIndex, gate_weights: torch.Tensor, w13: torch.Tensor,
                  w2: torch.Tensor) -> torch.Tensor:
    """`unpermute(grouped_swiglu(permute(x, index), w13, w2, index.tokens_per_expert), index, gate_weights)`
    as one op: x [T, d] token rows -> [T, d], each token's gate-weighted sum of its experts' outputs, with
    neither the [N, d] permuted rows nor the [N, d] expert outputs made or saved for backward. The
    backward gathers grad_out's rows per expert and takes each gate's gradient from the activation
    gradient (<grad_out[t] @ w2[e], act[r]> = <grad_out[t], y[r]>); the input gradient comes back summed
    per token. index.tokens_per_expert must have E entries (no virtual expert). CPU, extension only
    (check `grouped_swiglu_supported`); the reference is the three ops it fuses."""
    _load_extension()
    return torch.ops.moe.routed_swiglu(x, index.dest_rows, gate_weights, w13, w2, index.tokens_per_expert,
                                       index.num_rows)[0]


def topk_indices(scores: torch.Tensor, k: int, backend: str = "reference") -> torch.Tensor:
    """[T, E] -> [T, k] int64: the indices of each row's k largest scores, in descending order (what
    the routers keep of torch.topk). The reference is `torch.topk(scores, k).indices`; the compiled
    CPU kernel (moe/csrc/router_cpu.cpp) makes one pass over the experts with a token per vector lane
    for fp32 scores (k <= 16; measured on one thread, 2,048 tokens, k = 8: 0.29 ms for 64 experts and
    0.51 ms for 128, against torch.topk's 1.9 and 3.4 ms), one pass over a row otherwise, and orders
    equal scores by index (torch.topk leaves ties unspecified). Not differentiable: indices."""
    if scores.device.type in ("cpu", "meta") and scores.dim() == 2 and _use_extension(backend, scores):
        return torch.ops.moe.topk_indices(scores.detach(), k)
    return torch.topk(scores, k, dim=-1).indices
