"""The compiled backend: loading moe._C and registering its Python-side kernels with torch.library.

The C++/CUDA extension `moe._C` (moe/csrc/, built by setup.py) registers the dispatcher ops
torch.ops.moe.{routing_index, permute, unpermute, unpermute_backward}, with CPU (and, in a CUDA
build, CUDA) kernels, plus the CPU-only ops grouped_swiglu, routed_swiglu and their backwards (experts) and
topk_indices (routers). It is
imported lazily, on first use, by `_load_extension()`, which also registers their fake (meta)
kernels and autograd formulas, so the ops work under torch.compile (fullgraph) and with autograd:

- permute(x, dest_rows, num_rows): backward = unpermute(grad, dest_rows, None), a deterministic
  per-token gather-sum (no atomics); double backward is permute again.
- unpermute(y, dest_rows, gate_weights): backward = unpermute_backward -> (grad_y, grad_w).
- grouped_swiglu(x, w13, w2, counts) -> (out, h13, act): backward = grouped_swiglu_backward from
  the saved h13 and act (no double backward, like the reference's hand-written backward).
- routed_swiglu(x, dest_rows, gate_weights, w13, w2, counts, num_rows) -> (out [T, d], h13, act):
  permute + grouped_swiglu + unpermute in one op; backward = routed_swiglu_backward -> (grad_x,
  grad_gate_weights, grad_w13, grad_w2). num_rows (the kept rows) sizes h13 and act for the fake kernel.
- topk_indices(scores, k): the routers' top-k indices (CPU); integer output, no autograd.
- routing_index: its output size (kept rows) is data dependent. The fake kernel returns a static
  size T * k when nothing can be dropped (capacity None or >= T * k) and otherwise an unbacked
  SymInt (ctx.new_dynamic_size, 0 <= rows <= min(T * k, E * capacity)); so it can stay inside a
  compiled graph. Its outputs are integer index tensors and need no autograd (priority is detached).

`_extension_devices()` loads the extension and names the device types it has kernels for;
torch.compile evaluates it at trace time (assume_constant_result), so a first use inside a compiled
region works too. Importing this module imports neither moe._C nor torch._dynamo.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch

from moe.errors import MoeError

# The environment switches of the ops and the values each knows (unset or empty: the default).
ENVIRONMENT_SWITCHES = {
    "MOE_DISPATCH": ("auto", "extension", "reference"),
    "MOE_CPU_ISA": ("avx2", "base"),
    "MOE_CPU_GEMM": ("own", "aten"),
}


def check_environment() -> None:
    """Raise a MoeError naming the variable when one of ENVIRONMENT_SWITCHES is set to a value it does
    not know (the C++ side reads MOE_CPU_ISA and MOE_CPU_GEMM once and would take a typo for the
    default). `_load_extension` runs it, and moe.validate for a model with experts, before anything
    is built."""
    for name, known in ENVIRONMENT_SWITCHES.items():
        value = os.environ.get(name, "")
        if value and value not in known:
            raise MoeError(f"{name}={value}: unknown value; known: {', '.join(known)} (or unset)")


_EXT = None  # the imported moe._C once its Python-side kernels are registered
_EXT_ERROR: Optional[BaseException] = None


def load_error() -> Optional[BaseException]:
    """Why moe._C could not be loaded (None when it loaded or was not tried yet)."""
    return _EXT_ERROR


def extension_available() -> bool:
    """True when the compiled dispatch extension is importable (imports it, lazily, on first call)."""
    return bool(_extension_devices())


def extension_devices() -> tuple:
    """The device types moe._C has kernels for: () when it is not built, ("cpu",) or ("cpu", "cuda")."""
    return tuple(d for d in _extension_devices().split(",") if d and d != "meta")


def _load_extension():
    """Import moe._C (which registers torch.ops.moe.*) and register the fake kernels and autograd
    formulas, once. Raises ImportError (with the original error as cause) when it is not built."""
    global _EXT, _EXT_ERROR
    if _EXT is not None:
        return _EXT
    if _EXT_ERROR is not None:
        raise ImportError(f"moe._C is not available: {_EXT_ERROR!r}") from _EXT_ERROR
    check_environment()
    try:
        # deferred: the extension is optional (MOE_BUILD_EXT=0, a failed build), and importing it
        # registers torch.ops.moe.*, which only the compiled backend needs
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
    is loaded, its own decorator is used. (tests/unit/nn/test_moe_layer.py compiles the layer
    fullgraph: it fails if the mark is not honoured.)"""
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


def _register_python_kernels(ext) -> None:
    """Fake kernels (shape propagation for torch.compile / meta tensors) and autograd of the ops."""
    if getattr(ext, "_moe_python_kernels", False):  # survives importlib.reload(moe.ops.extension)
        return
    _register_dispatch_kernels(torch.library)
    _register_expert_kernels(torch.library)
    ext._moe_python_kernels = True


def _register_dispatch_kernels(lib) -> None:
    """routing_index, permute, unpermute, unpermute_backward: fake kernels; permute/unpermute autograd."""

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

    lib.register_autograd("moe::permute", _permute_backward, setup_context=_permute_setup)
    lib.register_autograd("moe::unpermute", _unpermute_backward, setup_context=_unpermute_setup)


def _register_expert_kernels(lib) -> None:
    """grouped_swiglu, routed_swiglu and their backwards: fake kernels and autograd. topk_indices
    (the routers' selection): its fake kernel; its output is indices, with no autograd."""

    @lib.register_fake("moe::topk_indices")
    def _topk_indices_fake(scores, k):
        torch._check(scores.dim() == 2 and 0 <= k <= scores.shape[1])
        return scores.new_empty(scores.shape[0], k, dtype=torch.long)

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

    lib.register_autograd("moe::grouped_swiglu", _grouped_swiglu_backward, setup_context=_grouped_swiglu_setup)

    @lib.register_fake("moe::routed_swiglu")
    def _routed_swiglu_fake(x, dest_rows, gate_weights, w13, w2, counts, num_rows):
        h = w2.shape[2]
        return x.new_empty(x.shape[0], w2.shape[1]), x.new_empty(num_rows, 2 * h), x.new_empty(num_rows, h)

    @lib.register_fake("moe::routed_swiglu_backward")
    def _routed_swiglu_backward_fake(grad_out, x, dest_rows, gate_weights, w13, w2, counts, h13, act):
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                torch.empty_like(gate_weights, memory_format=torch.contiguous_format),
                torch.empty_like(w13, memory_format=torch.contiguous_format),
                torch.empty_like(w2, memory_format=torch.contiguous_format))

    def _routed_swiglu_setup(ctx, inputs, output):
        x, dest_rows, gate_weights, w13, w2, counts, _ = inputs
        _, h13, act = output
        ctx.mark_non_differentiable(h13, act)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, dest_rows, gate_weights, w13, w2, counts, h13, act)

    def _routed_swiglu_backward(ctx, grad_out, _grad_h13, _grad_act):
        x, dest_rows, gate_weights, w13, w2, counts, h13, act = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None, None, None
        grad_x, grad_gates, grad_w13, grad_w2 = torch.ops.moe.routed_swiglu_backward(
            grad_out, x, dest_rows, gate_weights, w13, w2, counts, h13, act)
        return grad_x, None, grad_gates, grad_w13, grad_w2, None, None

    lib.register_autograd("moe::routed_swiglu", _routed_swiglu_backward, setup_context=_routed_swiglu_setup)
