"""Token dispatch ops: route (token, slot) pairs into an expert-contiguous buffer and back.

Three ops, each differentiable:
- `build_routing_index(expert_indices[T, k], num_experts, capacity, priority)` -> RoutingIndex:
  per-expert kept counts and, for each (token, slot), its row in the expert-sorted buffer (-1 when
  dropped). Within an expert, rows are in token order (stable), so results are deterministic.
- `permute(x[T, d], index)` -> [rows, d]: gather token rows into expert order (dropped slots skipped).
- `unpermute(y[rows, d], index, gate_weights[T, k])` -> [T, d]: each token's weighted sum of its
  expert outputs; dropped slots contribute zero (the residual path carries the token unchanged).

This file holds the pure-PyTorch reference. A compiled backend, when present, is chosen by
`dispatch_backend()`; the reference is always importable and is what tests compare against.

Compiled backend (`backend="extension"`): the C++/CUDA extension `moe._C` (moe/csrc/, built by
setup.py) registers four dispatcher ops, torch.ops.moe.{routing_index, permute, unpermute,
unpermute_backward}, with CPU (and, in a CUDA build, CUDA) kernels, plus the CPU-only expert ops
grouped_swiglu and grouped_swiglu_backward (`grouped_swiglu` below, used by moe/nn/experts.py). It is
imported lazily, on first use, by `_load_extension()`, which also registers their fake (meta)
kernels and autograd formulas with torch.library, so the ops work under torch.compile (fullgraph)
and with autograd:

- permute(x, dest_rows, num_rows): backward = unpermute(grad, dest_rows, None), a deterministic
  per-token gather-sum (no atomics); double backward is permute again.
- unpermute(y, dest_rows, gate_weights): backward = unpermute_backward -> (grad_y, grad_w).
- grouped_swiglu(x, w13, w2, counts) -> (out, h13, act): backward = grouped_swiglu_backward from
  the saved h13 and act (no double backward, like the reference's hand-written backward).
- routing_index: its output size (kept rows) is data dependent. The fake kernel returns a static
  size T * k when nothing can be dropped (capacity None or >= T * k) and otherwise an unbacked
  SymInt (ctx.new_dynamic_size, 0 <= rows <= min(T * k, E * capacity)); so it can stay inside a
  compiled graph. Its outputs are integer index tensors and need no autograd (priority is detached).
  Host syncs follow the same line: when nothing can be dropped the CUDA kernel (and the reference)
  never wait for the device, so a dropless layer can be captured in a CUDA graph, and an expert index
  outside [0, E) is reported by a device-side assert; a capacity that can drop syncs once for the size.

The extension is loaded by `_extension_devices()`, which torch.compile evaluates at trace time
(assume_constant_result), so a first use inside a compiled region works too. Tensors on a device the
build has no kernels for (e.g. CUDA with a CPU-only build) fall back to the reference with a warning.
CPU kernels are built for the baseline ISA and for AVX2+F16C (picked at run time; MOE_CPU_ISA=base
forces the baseline; both give bitwise identical results); MOE_NO_THP_HINT=1 turns off the
transparent-huge-page hint on large fresh outputs. See moe/csrc/ and benchmarks/dispatch.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RoutingIndex:
    tokens_per_expert: torch.Tensor
    """[E] int64: kept (token, slot) pairs per expert."""
    dest_rows: torch.Tensor
    """[T, k] int64: row of each (token, slot) in the permuted buffer, -1 when dropped."""
    source_tokens: torch.Tensor
    """[rows] int64: the token each permuted row came from."""
    num_rows: int
    """Kept (token, slot) pairs = rows of the permuted buffer."""
    num_dropped: int
    """Dropped (token, slot) pairs."""


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float,
                    min_capacity: int) -> Optional[int]:
    """Per-expert capacity, or None for dropless (capacity_factor == 0)."""
    if capacity_factor <= 0:
        return None
    import math

    return max(min_capacity, int(math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def expert_counts(expert_indices: torch.Tensor, num_experts: int,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[E] int64: how many entries of `expert_indices` (any shape) name each expert; with `mask` (same
    shape, bool) only the True ones. Unlike bincount (whose length depends on the largest index) the
    shape is static, so it stays inside a compiled graph and makes no host sync on a GPU."""
    idx = expert_indices.reshape(-1).long()
    ones = torch.ones_like(idx) if mask is None else mask.reshape(-1).long()
    return torch.zeros(num_experts, dtype=torch.long, device=idx.device).index_add_(0, idx, ones)


def build_routing_index_reference(expert_indices: torch.Tensor, num_experts: int,
                                  capacity: Optional[int] = None,
                                  priority: Optional[torch.Tensor] = None) -> RoutingIndex:
    """Reference: sorts (the compiled backend uses a counting sort; results are identical).

    With a capacity, an expert keeps its `capacity` (token, slot) pairs of highest `priority`
    (ties and priority=None: earliest token first); the rest are dropped.
    """
    T, k = expert_indices.shape
    flat = expert_indices.reshape(-1).long()
    n = flat.numel()
    dev = flat.device
    if n and dev.type == "cpu" and not torch.compiler.is_compiling():
        # free on the host; on a GPU it would be a sync (dropless, index_add_ asserts on the device)
        bad = (flat < 0) | (flat >= num_experts)
        if bad.any():
            raise RuntimeError(f"routing index: expert index {int(flat[bad][0])} outside [0, {num_experts})")
    if capacity is not None:
        if priority is None:
            order = torch.arange(n, device=dev)
        else:
            order = torch.argsort(priority.reshape(-1).float(), descending=True, stable=True)
        order = order[torch.argsort(flat[order], stable=True)]
        counts_all = expert_counts(flat, num_experts)
        starts = torch.cumsum(counts_all, 0) - counts_all
        rank = torch.empty(n, dtype=torch.long, device=dev)
        rank[order] = torch.arange(n, device=dev) - starts[flat[order]]
        kept = rank < capacity
        key = torch.where(kept, flat, torch.full_like(flat, num_experts))
        num_rows = int(kept.sum())  # data dependent: a host sync
        tokens_per_expert = expert_counts(flat, num_experts, kept)
    else:  # dropless: every pair kept, so the size is known and nothing waits for the device
        key, num_rows = flat, n
        tokens_per_expert = expert_counts(flat, num_experts)
    sorted_pairs = torch.argsort(key, stable=True)
    kept_pairs = sorted_pairs[:num_rows]
    dest = torch.full((n,), -1, dtype=torch.long, device=dev)
    dest[kept_pairs] = torch.arange(num_rows, device=dev)
    return RoutingIndex(
        tokens_per_expert=tokens_per_expert,
        dest_rows=dest.view(T, k),
        source_tokens=kept_pairs // k,
        num_rows=num_rows,
        num_dropped=n - num_rows,
    )


def permute_reference(x: torch.Tensor, index: RoutingIndex) -> torch.Tensor:
    return x.index_select(0, index.source_tokens)


def unpermute_reference(y: torch.Tensor, index: RoutingIndex, gate_weights: torch.Tensor) -> torch.Tensor:
    dest = index.dest_rows
    valid = dest >= 0
    gathered = y.index_select(0, dest.clamp(min=0).reshape(-1)).view(*dest.shape, y.shape[-1])
    weights = (gate_weights * valid).to(y.dtype)
    return torch.einsum("tkd,tk->td", gathered, weights)


# ------------------------------------------------------------------------------------ backend choice


def extension_available() -> bool:
    """True when the compiled dispatch extension is importable (imports it, lazily, on first call)."""
    return bool(_extension_devices())


def extension_devices() -> tuple:
    """The device types moe._C has kernels for: () when it is not built, ("cpu",) or ("cpu", "cuda")."""
    return tuple(d for d in _extension_devices().split(",") if d and d != "meta")


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
                               f"built ({_EXT_ERROR!r}); reinstall with `make install` or use dispatch=reference")
        return "extension"
    return "extension" if extension_available() else "reference"


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


def grouped_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The compiled grouped expert SwiGLU (moe._C, CPU): E SwiGLU FFNs over expert-sorted rows x [N, d],
    expert e taking the next counts[e] rows; w13 [E, 2h, d], w2 [E, d, h] -> [N, d]. The reference is
    moe.nn.experts `_loop` (same math, one multi-threaded GEMM per expert); check
    `grouped_swiglu_supported` first. counts stays a tensor: no host list is built."""
    _load_extension()
    return torch.ops.moe.grouped_swiglu(x, w13, w2, counts)[0]


# ------------------------------------------------------------------------- compiled backend (moe._C)

_EXT = None  # the imported moe._C once its Python-side kernels are registered
_EXT_ERROR: Optional[BaseException] = None
_WARNED_DEVICES: set = set()


def _load_extension():
    """Import moe._C (which registers torch.ops.moe.*) and register the fake kernels and autograd
    formulas, once. Raises ImportError (with the original error as cause) when it is not built."""
    global _EXT, _EXT_ERROR
    if _EXT is not None:
        return _EXT
    if _EXT_ERROR is not None:
        raise ImportError(f"moe._C is not available: {_EXT_ERROR!r}") from _EXT_ERROR
    try:
        import moe._C as ext

        _register_python_kernels(ext)
    except Exception as e:  # not built, ABI mismatch, ...
        _EXT_ERROR = e
        raise ImportError(f"moe._C is not available: {e!r}") from e
    _EXT = ext
    return ext


def _assume_constant_result(fn):
    """`torch.compiler.assume_constant_result` without importing torch._dynamo when nothing else has:
    that import is 2.4 s of every process's start-up (each `moe` command, each rank), and dynamo's
    decorator only marks the function with this attribute, which it reads when it traces. Once dynamo
    is loaded, its own decorator is used. (tests/test_layer.py compiles the layer fullgraph: it fails
    if the mark is not honoured.)"""
    import sys

    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _extension_devices() -> str:
    """Loads moe._C (once) and returns the device types it has kernels for ("cpu,meta" or
    "cpu,meta,cuda"), or "" when it cannot be loaded. torch.compile calls this at trace time and
    bakes the answer into the graph, so even a first use inside a compiled region works."""
    try:
        ext = _load_extension()
    except ImportError:
        return ""
    return "cpu,meta,cuda" if ext.cuda_compiled() else "cpu,meta"


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
                           f"built ({_EXT_ERROR!r}); reinstall with `make install` or use dispatch=reference")
    dev = t.device.type
    if dev in devices.split(","):
        return True
    if dev not in _WARNED_DEVICES:
        _WARNED_DEVICES.add(dev)
        import warnings

        warnings.warn(f"moe._C has no {dev} kernels (it has: {devices}); token dispatch on {dev} uses the "
                      "PyTorch reference", RuntimeWarning, stacklevel=3)
    return False


def _register_python_kernels(ext) -> None:
    """Fake kernels (shape propagation for torch.compile / meta tensors) and autograd of the ops."""
    if getattr(ext, "_moe_python_kernels", False):  # survives importlib.reload(moe.ops)
        return
    lib = torch.library

    @lib.register_fake("moe::routing_index")
    def _routing_index_fake(expert_indices, num_experts, capacity=None, priority=None):
        T, k = expert_indices.shape
        n = T * k
        if capacity is None or capacity >= n:
            rows = n  # nothing can be dropped: static size
        else:
            rows = lib.get_ctx().new_dynamic_size(min=0, max=min(n, num_experts * capacity))
        long = dict(dtype=torch.long, device=expert_indices.device)
        return (torch.empty(num_experts, **long), torch.empty(T, k, **long), torch.empty(rows, **long))

    @lib.register_fake("moe::permute")
    def _permute_fake(x, dest_rows, num_rows):
        torch._check(x.shape[0] == dest_rows.shape[0])
        return x.new_empty((num_rows, *x.shape[1:]))

    @lib.register_fake("moe::unpermute")
    def _unpermute_fake(y, dest_rows, gate_weights):
        return y.new_empty((dest_rows.shape[0], *y.shape[1:]))

    @lib.register_fake("moe::unpermute_backward")
    def _unpermute_backward_fake(grad_out, y, dest_rows, gate_weights):
        return torch.empty_like(y, memory_format=torch.contiguous_format), torch.empty_like(
            gate_weights, memory_format=torch.contiguous_format)

    def _permute_setup(ctx, inputs, output):
        _, dest_rows, _ = inputs
        ctx.save_for_backward(dest_rows)

    def _permute_backward(ctx, grad):
        (dest_rows,) = ctx.saved_tensors
        return torch.ops.moe.unpermute(grad, dest_rows, None), None, None

    def _unpermute_setup(ctx, inputs, output):
        y, dest_rows, gate_weights = inputs
        ctx.num_rows = y.shape[0]
        ctx.save_for_backward(y if gate_weights is not None else None, dest_rows, gate_weights)

    def _unpermute_backward(ctx, grad):
        y, dest_rows, gate_weights = ctx.saved_tensors
        if gate_weights is None:
            return torch.ops.moe.permute(grad, dest_rows, ctx.num_rows), None, None
        grad_y, grad_w = torch.ops.moe.unpermute_backward(grad, y, dest_rows, gate_weights)
        return grad_y, None, grad_w

    @lib.register_fake("moe::grouped_swiglu")
    def _grouped_swiglu_fake(x, w13, w2, counts):
        N, h = x.shape[0], w2.shape[2]
        return x.new_empty(N, w2.shape[1]), x.new_empty(N, 2 * h), x.new_empty(N, h)

    @lib.register_fake("moe::grouped_swiglu_backward")
    def _grouped_swiglu_backward_fake(grad_out, x, w13, w2, counts, h13, act):
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                torch.empty_like(w13, memory_format=torch.contiguous_format),
                torch.empty_like(w2, memory_format=torch.contiguous_format))

    def _grouped_swiglu_setup(ctx, inputs, output):
        x, w13, w2, counts = inputs
        _, h13, act = output
        ctx.mark_non_differentiable(h13, act)  # saved activations, not results
        ctx.set_materialize_grads(False)  # no zero-filled gradients for them
        ctx.save_for_backward(x, w13, w2, counts, h13, act)

    def _grouped_swiglu_backward(ctx, grad_out, _grad_h13, _grad_act):
        x, w13, w2, counts, h13, act = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None
        grad_x, grad_w13, grad_w2 = torch.ops.moe.grouped_swiglu_backward(grad_out, x, w13, w2, counts, h13, act)
        return grad_x, grad_w13, grad_w2, None

    lib.register_autograd("moe::permute", _permute_backward, setup_context=_permute_setup)
    lib.register_autograd("moe::unpermute", _unpermute_backward, setup_context=_unpermute_setup)
    lib.register_autograd("moe::grouped_swiglu", _grouped_swiglu_backward, setup_context=_grouped_swiglu_setup)
    ext._moe_python_kernels = True
