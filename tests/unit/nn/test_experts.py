import os
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from moe import ops
from moe.nn.experts import EXPERT_IMPLS, ExpertBackend, Experts, _GroupedSwiGLU, grouped_mm_shape_error
from moe.nn.ffn import swiglu
from tests.helpers import DEVICE, ROOT


def reference(x, w13, w2, counts):
    outs, start = [], 0
    for e, c in enumerate(counts):
        xe = x[start:start + c]
        outs.append(swiglu(xe @ w13[e].t()) @ w2[e].t())
        start += c
    return torch.cat(outs)


HAVE_GROUPED_MM = hasattr(torch, "_grouped_mm")
needs_grouped_mm = pytest.mark.skipif(not HAVE_GROUPED_MM, reason=f"torch {torch.__version__} has no _grouped_mm")
# On CUDA the grouped GEMM's CUTLASS kernels run bf16 only (torch's fallback elsewhere); on CPU its
# fallback runs fp32 and bf16.
GROUPED_DTYPES = [torch.bfloat16] if DEVICE.type == "cuda" else [torch.float32, torch.bfloat16]


@needs_grouped_mm
@pytest.mark.parametrize("dtype", GROUPED_DTYPES, ids=str)
@pytest.mark.parametrize("counts", [[64, 0, 48, 16], [128, 0, 0, 0], [32, 32, 32, 32], [13, 0, 50, 1],
                                    [0, 0, 0, 0]], ids=str)
def test_grouped_impl_matches_loop(counts, dtype):
    """`grouped` (one torch._grouped_mm per projection, device offsets) against `loop` in the same dtype
    and the fp64 reference, forward and all three gradients: its error at most twice the loop's.
    Segments of any length (odd, empty, none at all)."""
    g = torch.Generator().manual_seed(0)
    n, d, h = sum(counts), 64, 96
    base = [torch.randn(n, d, generator=g), torch.randn(4, 2 * h, d, generator=g) / d ** 0.5,
            torch.randn(4, d, h, generator=g) / h ** 0.5]
    grad = torch.randn(n, d, generator=g)

    def run(impl, dt):
        x, w13, w2 = [t.to(DEVICE, dt).requires_grad_() for t in base]
        out = EXPERT_IMPLS[impl].forward(x, w13, w2, torch.tensor(counts, device=DEVICE))
        grads = torch.autograd.grad(out, (x, w13, w2), grad.to(DEVICE, dt), allow_unused=True)
        return [t.double() for t in (out, *(torch.zeros_like(a) if gr is None else gr
                                             for a, gr in zip((x, w13, w2), grads)))]

    exact = run("loop", torch.float64)
    for got, loop, want in zip(run("grouped", dtype), run("loop", dtype), exact):
        assert torch.isfinite(got).all()
        if want.numel():
            assert (got - want).abs().max() <= 2 * (loop - want).abs().max() + 1e-5


@needs_grouped_mm
def test_grouped_impl_casts_to_the_autocast_dtype():
    """torch._grouped_mm is no autocast op: under autocast `grouped` runs in the autocast dtype itself."""
    counts = torch.tensor([5, 0, 11], device=DEVICE)
    x = torch.randn(16, 32, device=DEVICE)
    w13, w2 = torch.randn(3, 48, 32, device=DEVICE), torch.randn(3, 32, 24, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = EXPERT_IMPLS["grouped"].forward(x, w13, w2, counts)
    assert out.dtype == torch.bfloat16
    want = EXPERT_IMPLS["grouped"].forward(x.bfloat16(), w13.bfloat16(), w2.bfloat16(), counts)
    assert torch.equal(out, want)


def test_registry_of_backends_by_name():
    """EXPERT_IMPLS maps each name to an ExpertBackend class of that name; every backend computes the
    same E SwiGLU FFNs (float64, tight), and says which shapes it cannot run."""
    assert sorted(EXPERT_IMPLS) == ["grouped", "loop", "padded"]
    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 5]
    x = torch.randn(8, 16, generator=g, dtype=torch.float64)
    w13 = torch.randn(3, 2 * 8, 16, generator=g, dtype=torch.float64)
    w2 = torch.randn(3, 16, 8, generator=g, dtype=torch.float64)
    want = reference(x, w13, w2, counts)
    for name, backend in EXPERT_IMPLS.items():
        assert issubclass(backend, ExpertBackend) and backend.name == name
        assert backend.shape_error(16, 8, torch.float32) is None or name == "grouped"
        if name == "grouped" and backend.shape_error(16, 8, torch.float64) is not None:
            continue  # torch._grouped_mm runs no float64
        torch.testing.assert_close(backend.forward(x, w13, w2, torch.tensor(counts)), want)
    assert EXPERT_IMPLS["grouped"].shape_error(12, 16, torch.bfloat16) == grouped_mm_shape_error(12, 16, torch.bfloat16)
    assert EXPERT_IMPLS["loop"].shape_error(12, 16, torch.bfloat16) is None


def test_auto_picks_grouped_on_cuda_bf16_with_aligned_shapes():
    from moe.nn.experts import resolve_experts_impl

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    want = "grouped" if HAVE_GROUPED_MM else "loop"
    assert resolve_experts_impl("auto", cuda, torch.bfloat16, 512, 1024) == want
    assert resolve_experts_impl("auto", cuda, torch.bfloat16, 512, 1020) == "loop"  # 2040-byte rows
    assert resolve_experts_impl("auto", cuda, torch.float32, 512, 1024) == "loop"
    assert resolve_experts_impl("auto", cpu, torch.bfloat16, 512, 1024) == "loop"
    assert resolve_experts_impl("padded", cpu, torch.float32, 5, 7) == "padded"


@needs_grouped_mm
def test_grouped_impl_rejects_unaligned_shapes_by_key():
    from moe.config import ConfigError, load_config
    from moe.validate import validate

    experts = Experts(2, 12, 20, 0.02, 0.02, impl="grouped")  # 12 x 2 bytes: not a multiple of 16 in bf16
    with pytest.raises(ValueError, match="model.moe.experts_impl=grouped: .*d_model=12"):
        experts(torch.randn(3, 12, dtype=torch.bfloat16), torch.tensor([1, 2]))
    cfg = load_config("experiments/quickstart_moe.yaml", ["model.moe.experts_impl=grouped",
                                                          "model.moe.expert_hidden=100"])
    with pytest.raises(ConfigError, match="model.moe.experts_impl=grouped: .*expert_hidden=100"):
        validate(cfg)


def test_reference_grouped_swiglu_gradcheck():
    torch.manual_seed(0)
    counts = [2, 0, 3]
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w13 = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: _GroupedSwiGLU.apply(a, b, c, counts), (x, w13, w2))


# ------------------------------------------------------- compiled grouped SwiGLU (moe._C, CPU)

HAVE_EXT = ops.extension_available()
needs_ext = pytest.mark.skipif(
    not HAVE_EXT, reason="moe._C is not built: run `.venv/bin/pip install --no-build-isolation -e .`")
COUNTS = [[3, 0, 5, 1], [9, 0, 0, 0], [0, 0, 0, 1], [2, 2, 2, 2], [0, 0, 0, 0],
          [150, 7, 0, 99]]  # the last: large enough for several threads, pieces split across experts
TOL = {torch.float64: {}, torch.float32: dict(rtol=1e-4, atol=1e-5)}


def _assert_matches(got, want):
    """fp64 to rounding; fp32 within rtol 1e-4 and an atol of 1e-5 of the tensor's largest value: the
    compiled fp32 GEMM (AVX2 build) rounds once per multiply-add and sums in its own order, so it meets
    ATen's GEMM within rounding, not bitwise, and an element that cancels keeps the absolute error of
    the large terms it sums."""
    if want.dtype != torch.float32:
        torch.testing.assert_close(got, want, **TOL[want.dtype])
        return
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, scale))


def _weights(counts, d, h, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    E, n = len(counts), sum(counts)
    x = (scale * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    w13 = (torch.randn(E, 2 * h, d, generator=g, dtype=torch.float64) / d ** 0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(E, d, h, generator=g, dtype=torch.float64) / h ** 0.5).to(dtype).requires_grad_()
    return x, w13, w2


def _fwd_bwd(fn, x, w13, w2, seed=1):
    out = fn(x, w13, w2)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, (x, w13, w2), g, allow_unused=True)
    return [out, *(torch.zeros_like(t) if gr is None else gr for t, gr in zip((x, w13, w2), grads))]


def _assert_bf16_within_twice_the_reference(got, want, exact):
    """bf16 results rounded at other places than the reference's (the SwiGLU once, in fp32): each error
    against the fp64 `exact`, as a norm over the whole tensor (stable where single elements are not,
    cancellations), at most twice the bf16 reference `want`'s plus one rounding."""
    eps = torch.finfo(torch.bfloat16).eps
    for a, b, c in zip(got, want, exact):
        if c.numel():
            ours, ref = (a.double() - c).norm().item(), (b.double() - c).norm().item()
            assert ours <= 2 * ref + eps * c.norm().item(), (ours, ref)


def _fwd_bwd_on_threads(threads, fn, x, w13, w2):
    """_fwd_bwd(fn, ...) computed on `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _fwd_bwd(fn, x, w13, w2)
    finally:
        torch.set_num_threads(previous)


def _compiled_fwd_bwd(counts_t, x, w13, w2, threads):
    """The compiled op's output and three gradients, computed on `threads` threads."""
    return _fwd_bwd_on_threads(threads, lambda a, b, c: ops.grouped_swiglu(a, b, c, counts_t), x, w13, w2)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("counts", COUNTS, ids=str)
def test_grouped_swiglu_extension_matches_reference(counts, dtype):
    """ops.grouped_swiglu (compiled) against the reference `loop` backend, forward and all three gradients.
    bf16 (rounded at other places than the reference: the SwiGLU once, in fp32): both against the
    reference in fp64, the compiled op's error at most twice the bf16 reference's."""
    d, h = 24, 40  # h = 40: the SwiGLU's vector loop and its tail
    x, w13, w2 = _weights(counts, d, h, dtype)
    counts_t = torch.tensor(counts)
    got = _fwd_bwd(lambda a, b, c: ops.grouped_swiglu(a, b, c, counts_t), x, w13, w2)
    want = _fwd_bwd(lambda a, b, c: EXPERT_IMPLS["loop"].forward(a, b, c, torch.tensor(counts)), x, w13, w2)
    if dtype != torch.bfloat16:
        for a, b in zip(got, want):
            assert a.dtype == dtype
            _assert_matches(a, b)
        return
    exact = _fwd_bwd(lambda a, b, c: EXPERT_IMPLS["loop"].forward(a, b, c, torch.tensor(counts)),
                     *[t.detach().double().requires_grad_() for t in (x, w13, w2)])
    for a, b, c in zip(got, want, exact):
        assert a.dtype == dtype
        if c.numel():
            ref_err = (b.double() - c).abs().max().item()
            assert (a.double() - c).abs().max().item() <= 2 * ref_err + 1e-3


@needs_ext
@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(counts=st.lists(st.integers(0, 80), min_size=1, max_size=6), d=st.integers(1, 40), h=st.integers(1, 40),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), threads=st.integers(1, 3))
def test_grouped_swiglu_matches_reference_for_any_counts(counts, d, h, dtype, threads):
    """Any expert counts (empty experts, one expert, a segment split between threads), widths (the
    fused SwiGLU's vector loop and tail) and thread counts: the compiled op equals the reference
    loop, forward and all three gradients (bf16: against the fp64 reference, the error norm at most
    twice the bf16 reference's plus one rounding)."""
    if dtype == torch.bfloat16:  # bf16 errors compared as norms: tensors large enough for that
        assume(d >= 8 and h >= 8 and sum(counts) >= 8)
    x, w13, w2 = _weights(counts, d, h, dtype, seed=len(counts) + d + h)
    counts_t = torch.tensor(counts)
    got = _compiled_fwd_bwd(counts_t, x, w13, w2, threads)
    want = _fwd_bwd(lambda a, b, c: EXPERT_IMPLS["loop"].forward(a, b, c, counts_t), x, w13, w2)
    if dtype != torch.bfloat16:
        for a, b in zip(got, want):
            _assert_matches(a, b)
        return
    exact = _fwd_bwd(lambda a, b, c: EXPERT_IMPLS["loop"].forward(a, b, c, counts_t),
                     *[t.detach().double().requires_grad_() for t in (x, w13, w2)])
    _assert_bf16_within_twice_the_reference(got, want, exact)


@needs_ext
def test_compiled_grouped_swiglu_gradcheck():
    counts = [2, 0, 3]
    x, w13, w2 = _weights(counts, 4, 3, torch.float64)
    counts_t = torch.tensor(counts)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.grouped_swiglu(a, b, c, counts_t), (x, w13, w2))


@needs_ext
def test_grouped_swiglu_extreme_gates():
    """The fused SwiGLU's exp clamps its input: large |gate| (and inf) still match silu(gate) * up."""
    counts = [64, 64]
    x, w13, w2 = _weights(counts, 8, 37, torch.float32, scale=60.0)
    counts_t = torch.tensor(counts)
    got = _fwd_bwd(lambda a, b, c: ops.grouped_swiglu(a, b, c, counts_t), x, w13, w2)
    want = _fwd_bwd(lambda a, b, c: EXPERT_IMPLS["loop"].forward(a, b, c, torch.tensor(counts)), x, w13, w2)
    for a, b in zip(got, want):
        _assert_matches(a, b)
    inf = torch.tensor([[float("inf"), 100.0, -100.0, float("nan"), 1.0, 1.0, 1.0, 1.0]])
    eye13 = torch.eye(8).unsqueeze(0)  # h = 4: gates are the first 4 inputs, ups the last 4
    out = ops.grouped_swiglu(inf, eye13, torch.eye(8, 4).unsqueeze(0), torch.tensor([1]))
    ref = EXPERT_IMPLS["loop"].forward(inf, eye13, torch.eye(8, 4).unsqueeze(0), torch.tensor([1]))
    torch.testing.assert_close(out, ref, equal_nan=True)


@needs_ext
def test_grouped_swiglu_thread_counts_agree():
    """Results do not depend on how many threads share the rows (up to GEMM rounding)."""
    counts = [300, 1, 0, 211, 64]
    x, w13, w2 = _weights(counts, 64, 96, torch.float32)
    counts_t = torch.tensor(counts)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_fwd_bwd(lambda a, b, c: ops.grouped_swiglu(a, b, c, counts_t), x, w13, w2))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _whole_expert_split_fits(counts, parts, max_imbalance=0.03):
    """Mirror of experts_cpu.cpp `owner_ranges`: whether the backward gives each of `parts` threads whole
    experts (at least one expert a thread, each thread's rows within 3% of an even share) rather than a
    range of rows."""
    if len(counts) < parts:
        return False
    offs = [0]
    for c in counts:
        offs.append(offs[-1] + c)
    n, bounds = offs[-1], [0]
    for p in range(1, parts):
        target = n * p // parts
        e = next(i for i, o in enumerate(offs) if o >= target)
        if e > 0 and target - offs[e - 1] < offs[e] - target:
            e -= 1
        bounds.append(max(bounds[-1], e))
    bounds.append(len(counts))
    return all(offs[bounds[p + 1]] - offs[bounds[p]] <= n / parts * (1 + max_imbalance) for p in range(parts))


@needs_ext
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("case", ["many small experts", "few uneven experts"])
def test_grouped_swiglu_backward_both_thread_splits(case, threads):
    """The backward splits work over threads in two ways: whole experts per thread (many small experts,
    where that is even) or a range of rows plus a share of every weight gradient (a few uneven experts).
    Both equal the reference, forward and all three gradients, empty experts included."""
    if case == "many small experts":
        counts = [(7 * e) % 23 if e % 9 else 0 for e in range(96)]  # 96 experts, 0-22 rows each
    else:
        counts = [300, 1, 0, 211, 64]
    assert _whole_expert_split_fits(counts, threads) == (case == "many small experts")
    x, w13, w2 = _weights(counts, 64, 96, torch.float64)
    assert 6 * sum(counts) * 64 * 96 >= threads * (1 << 21)  # enough work for every thread (kMinFlopsPerThread)
    counts_t = torch.tensor(counts)
    got = _compiled_fwd_bwd(counts_t, x, w13, w2, threads)
    want = _fwd_bwd(lambda a, b, c: EXPERT_IMPLS["loop"].forward(a, b, c, counts_t), x, w13, w2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_swiglu_cpu_isa_variants_identical(dtype):
    """The fused SwiGLU of the baseline and AVX2 builds give bitwise identical results in bf16 (ATen's
    GEMM in both); in fp32 the AVX2 build's own GEMM (FMA) agrees within rounding."""
    from tests.helpers import assert_cpu_isa_variants_identical

    counts = [20, 0, 13]
    x, w13, w2 = _weights(counts, 16, 45, dtype, scale=3.0)
    counts_t = torch.tensor(counts)
    assert_cpu_isa_variants_identical(
        lambda: _fwd_bwd(lambda a, b, c: ops.grouped_swiglu(a, b, c, counts_t), x, w13, w2),
        compare=_assert_matches if dtype == torch.float32 else torch.equal)


@needs_ext
def test_grouped_swiglu_rejects_bad_counts():
    x, w13, w2 = _weights([3, 2], 4, 3, torch.float32)
    with pytest.raises(RuntimeError, match="counts sum to 4"):
        ops.grouped_swiglu(x, w13, w2, torch.tensor([2, 2]))
    with pytest.raises(RuntimeError, match="counts must be"):
        ops.grouped_swiglu(x, w13, w2, torch.tensor([5]))


@needs_ext
def test_grouped_swiglu_opcheck_and_compile():
    """Schema, fake kernels, autograd registration (opcheck), and a fullgraph torch.compile."""
    counts = [3, 0, 4]
    x, w13, w2 = _weights(counts, 6, 5, torch.float32)
    counts_t = torch.tensor(counts)
    result = torch.library.opcheck(torch.ops.moe.grouped_swiglu.default, (x, w13, w2, counts_t))
    assert all(v == "SUCCESS" for v in result.values()), result
    out, h13, act = torch.ops.moe.grouped_swiglu(x.detach(), w13.detach(), w2.detach(), counts_t)
    result = torch.library.opcheck(torch.ops.moe.grouped_swiglu_backward.default,
                                   (torch.randn_like(out), x.detach(), w13.detach(), w2.detach(), counts_t, h13, act))
    assert all(v == "SUCCESS" for v in result.values()), result
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: ops.grouped_swiglu(a, b, c, counts_t), fullgraph=True,
                             backend="aot_eager")
    for a, b in zip(_fwd_bwd(compiled, x, w13, w2),
                    _fwd_bwd(lambda a, b, c: ops.grouped_swiglu(a, b, c, counts_t), x, w13, w2)):
        torch.testing.assert_close(a, b)


def test_experts_module_picks_backend():
    """Experts(impl=loop) runs the compiled op with the extension backend on CPU, the reference otherwise;
    both agree."""
    torch.manual_seed(0)
    ref = Experts(4, 8, 6, 0.1, 0.1, impl="loop", backend="reference")
    x = torch.randn(10, 8)
    counts = torch.tensor([4, 0, 5, 1])
    out = ref(x, counts)
    assert out.grad_fn is not None and "GroupedSwiGLU" in type(out.grad_fn).__name__
    if HAVE_EXT:
        ext = Experts(4, 8, 6, 0.1, 0.1, impl="loop", backend="extension")
        ext.load_state_dict(ref.state_dict())
        got = ext(x, counts)
        assert "GroupedSwiGLU" not in type(got.grad_fn).__name__
        torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-6)


# ------------------------------- permute, experts and weighted combine in one compiled op (routed_swiglu)

# name -> (tokens T, experts E, top-k, per-expert logit bias (None: none), capacity (None: dropless))
ROUTED_CASES = {
    "many small experts": (256, 96, 8, [-60.0 if e % 9 == 0 else 0.0 for e in range(96)], None),  # whole experts
    "few uneven experts": (256, 5, 1, [2.5, 0.0, -60.0, 1.5, 1.0], None),  # the row split, a scatter-add
    "all rows on one expert": (300, 3, 1, [-60.0, 60.0, -60.0], None),
    "k = E": (64, 4, 4, None, None),
    "capacity drops": (200, 6, 2, None, 30),
    "no rows": (16, 3, 2, None, 0),
}


def _routed_inputs(case, d, h, dtype, seed=0):
    """Token rows, a routing index (the extension's), gate weights and expert weights for a case."""
    T, E, k, bias, capacity = ROUTED_CASES[case]
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    if bias is not None:
        logits = logits + torch.tensor(bias, dtype=torch.float64)
    top = logits.topk(k, dim=-1)
    index = ops.build_routing_index(top.indices, E, capacity, None, backend="extension")
    gates = torch.softmax(top.values, dim=-1).to(dtype).requires_grad_()
    _, w13, w2 = _weights([0] * E, d, h, dtype, seed=seed)
    x = torch.randn(T, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return x, index, gates, w13, w2


def _routed_composed(x, index, gates, w13, w2, backend="extension"):
    """What routed_swiglu fuses: permute, the `loop` experts, unpermute (the extension's ops, or the
    pure-PyTorch reference with backend="reference")."""
    y = EXPERT_IMPLS["loop"].forward(ops.permute(x, index, backend=backend), w13, w2, index.tokens_per_expert,
                                     backend)
    return ops.unpermute(y, index, gates, backend=backend)


def _routed_fwd_bwd(fn, inputs, threads=None, seed=1):
    """fn(*inputs)'s output and its gradients for every input (zeros where unused), on `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        out = fn(*inputs)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
        grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
    finally:
        torch.set_num_threads(previous)
    return [out, *(torch.zeros_like(t) if gr is None else gr for t, gr in zip(inputs, grads))]


@needs_ext
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ROUTED_CASES)
def test_routed_swiglu_equals_permute_experts_unpermute(case, dtype, threads):
    """routed_swiglu against the three ops it fuses, forward and the gradients of x, the gate weights
    and both expert weights, in both thread splits of the backward (the many-small-experts case takes
    whole experts per thread, the uneven one the row split: asserted through the split rule's mirror);
    fp64 and fp32 against the pure-PyTorch reference, bf16 within twice the bf16 composition's error
    against fp64."""
    x, index, gates, w13, w2 = _routed_inputs(case, 64, 48, dtype)
    counts = index.tokens_per_expert.tolist()
    if case in ("many small experts", "few uneven experts") and threads > 1:
        assert _whole_expert_split_fits(counts, threads) == (case == "many small experts")
    fused = lambda a, g, b, c: ops.routed_swiglu(a, index, g, b, c)  # noqa: E731
    got = _routed_fwd_bwd(fused, (x, gates, w13, w2), threads)
    assert [t.dtype for t in got] == [dtype] * 5 and [t.shape for t in got] == [x.shape, x.shape, gates.shape,
                                                                                w13.shape, w2.shape]
    if dtype != torch.bfloat16:
        want = _routed_fwd_bwd(lambda *t: _routed_composed(*t[:1], index, *t[1:], backend="reference"),
                               (x, gates, w13, w2))
        for a, b in zip(got, want):
            _assert_matches(a, b)
        return
    want = _routed_fwd_bwd(lambda a, g, b, c: _routed_composed(a, index, g, b, c), (x, gates, w13, w2), threads)
    exact = _routed_fwd_bwd(lambda *t: _routed_composed(*t[:1], index, *t[1:], backend="reference"),
                            tuple(t.detach().double().requires_grad_() for t in (x, gates, w13, w2)))
    _assert_bf16_within_twice_the_reference(got, want, exact)


@needs_ext
def test_routed_swiglu_takes_fp32_gates_with_bf16_rows():
    """The routers run in fp32 whatever the model dtype: bf16 rows with fp32 gate weights give a bf16
    output and an fp32 gate gradient, within twice the bf16 composition's error against fp64."""
    x, index, gates, w13, w2 = _routed_inputs("many small experts", 64, 48, torch.bfloat16)
    gates = gates.detach().float().requires_grad_()
    got = _routed_fwd_bwd(lambda a, g, b, c: ops.routed_swiglu(a, index, g, b, c), (x, gates, w13, w2))
    assert [t.dtype for t in got] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16]
    want = _routed_fwd_bwd(lambda a, g, b, c: _routed_composed(a, index, g, b, c), (x, gates, w13, w2))
    exact = _routed_fwd_bwd(lambda *t: _routed_composed(*t[:1], index, *t[1:], backend="reference"),
                            tuple(t.detach().double().requires_grad_() for t in (x, gates, w13, w2)))
    _assert_bf16_within_twice_the_reference(got, want, exact)


@needs_ext
def test_routed_swiglu_gradcheck_opcheck_and_compile():
    """fp64 gradcheck (with dropped pairs), opcheck of both ops, and a fullgraph torch.compile."""
    x, index, gates, w13, w2 = _routed_inputs("capacity drops", 4, 3, torch.float64)
    assert index.num_dropped > 0
    assert torch.autograd.gradcheck(lambda a, g, b, c: ops.routed_swiglu(a, index, g, b, c), (x, gates, w13, w2))
    x, index, gates, w13, w2 = _routed_inputs("k = E", 6, 5, torch.float32)
    args = (x, index.dest_rows, gates, w13, w2, index.tokens_per_expert, index.num_rows)
    result = torch.library.opcheck(torch.ops.moe.routed_swiglu.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    out, h13, act = torch.ops.moe.routed_swiglu(*(t.detach() if isinstance(t, torch.Tensor) else t for t in args))
    result = torch.library.opcheck(torch.ops.moe.routed_swiglu_backward.default,
                                   (torch.randn_like(out), x.detach(), index.dest_rows, gates.detach(), w13.detach(),
                                    w2.detach(), index.tokens_per_expert, h13, act))
    assert all(v == "SUCCESS" for v in result.values()), result
    torch._dynamo.reset()
    fn = lambda a, g, b, c: ops.routed_swiglu(a, index, g, b, c)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(_routed_fwd_bwd(compiled, (x, gates, w13, w2)), _routed_fwd_bwd(fn, (x, gates, w13, w2))):
        torch.testing.assert_close(a, b)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_routed_swiglu_cpu_isa_variants_identical(dtype):
    """The gate kernels (combine_rows, gate_rows) of the baseline and AVX2 builds agree bitwise in bf16
    (ATen's GEMM in both); in fp32 the AVX2 build's own GEMM (FMA) agrees within rounding."""
    from tests.helpers import assert_cpu_isa_variants_identical

    x, index, gates, w13, w2 = _routed_inputs("many small experts", 45, 16, dtype)
    assert_cpu_isa_variants_identical(
        lambda: _routed_fwd_bwd(lambda a, g, b, c: ops.routed_swiglu(a, index, g, b, c), (x, gates, w13, w2)),
        compare=_assert_matches if dtype == torch.float32 else torch.equal)


@pytest.fixture(params=["own", "aten"])
def cpu_gemm(request):
    """Each GEMM the fp32 expert ops can run in turn: the AVX2 build's own (gemm_cpu_kernels.h) and ATen's."""
    import moe._C as C

    start = C.cpu_gemm()
    try:
        if not C.set_cpu_gemm(request.param):
            pytest.skip("no own GEMM with the kernels in use (baseline build, or a CPU without AVX2 + FMA)")
        assert C.cpu_gemm() == request.param
        yield request.param
    finally:
        C.set_cpu_gemm(start)


# Shapes that cross every blocking edge of the own GEMM (6 x 16 tiles, K slices of 256, A blocks of 144
# rows): a segment of 300 rows (3 A blocks; its weight gradients sum 2 K slices), d = 270 (2 K slices;
# a 14-column tail panel), h = 40 (an 8-column tail), an empty expert, a 7-row one (a partial tile).
GEMM_COUNTS, GEMM_D, GEMM_H = [300, 7, 0, 161], 270, 40


@needs_ext
@pytest.mark.parametrize("threads", [1, 2])
def test_fp32_grouped_swiglu_gemms_match_fp64_reference(cpu_gemm, threads):
    """grouped_swiglu in fp32 with either GEMM against the fp64 reference loop, forward and the three
    gradients (1 thread: whole experts in the backward, so the own GEMM runs all five products; 2: the
    row split for these uneven experts)."""
    x, w13, w2 = _weights(GEMM_COUNTS, GEMM_D, GEMM_H, torch.float32)
    counts_t = torch.tensor(GEMM_COUNTS)
    got = _compiled_fwd_bwd(counts_t, x, w13, w2, threads)
    exact = _fwd_bwd(lambda a, b, c: EXPERT_IMPLS["loop"].forward(a, b, c, counts_t),
                     *[t.detach().double().requires_grad_() for t in (x, w13, w2)])
    for a, c in zip(got, exact):
        assert a.dtype == torch.float32
        _assert_matches(a, c.float())


@needs_ext
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", ["many small experts", "all rows on one expert", "capacity drops"])
def test_fp32_routed_swiglu_gemms_match_fp64_reference(cpu_gemm, case, threads):
    """routed_swiglu in fp32 with either GEMM against the fp64 reference composition at d = 270, h = 40
    (the own GEMM reads the token rows through the routing index and adds the gated outputs and the
    input gradients into the tokens' rows): forward and the gradients of x, the gates and both weights."""
    x, index, gates, w13, w2 = _routed_inputs(case, GEMM_D, GEMM_H, torch.float32)
    got = _routed_fwd_bwd(lambda a, g, b, c: ops.routed_swiglu(a, index, g, b, c), (x, gates, w13, w2), threads)
    exact = _routed_fwd_bwd(lambda *t: _routed_composed(*t[:1], index, *t[1:], backend="reference"),
                            tuple(t.detach().double().requires_grad_() for t in (x, gates, w13, w2)))
    for a, c in zip(got, exact):
        assert a.dtype == torch.float32
        _assert_matches(a, c.float())


@needs_ext
def test_cpu_gemm_switch():
    """set_cpu_gemm takes "own" or "aten" only, and "own" only where the kernels in use have it."""
    import moe._C as C

    start, isa = C.cpu_gemm(), C.cpu_isa()
    try:
        assert not C.set_cpu_gemm("mkl")
        assert C.set_cpu_gemm("aten") and C.cpu_gemm() == "aten"
        assert C.set_cpu_isa("base")
        assert not C.set_cpu_gemm("own") and C.cpu_gemm() == "aten"  # the baseline build has none
    finally:
        C.set_cpu_isa(isa)
        C.set_cpu_gemm(start)


@needs_ext
def test_own_gemm_is_the_default_on_avx2_cpus_without_avx512():
    """The own GEMM is AVX2: on a CPU with AVX-512 ATen's BLAS (16-lane FMAs) stays the default;
    MOE_CPU_GEMM=own|aten decides either way. A fresh process starts under that policy."""
    import moe._C as C

    assert C.own_gemm_by_default(None, False) and C.own_gemm_by_default("", False)
    assert not C.own_gemm_by_default(None, True) and not C.own_gemm_by_default("", True)
    assert C.own_gemm_by_default("own", True) and C.own_gemm_by_default("own", False)
    assert not C.own_gemm_by_default("aten", False) and not C.own_gemm_by_default("aten", True)
    env = {k: v for k, v in os.environ.items() if k not in ("MOE_CPU_GEMM", "MOE_CPU_ISA")}
    code = "import torch, moe._C as C; print(C.cpu_gemm(), C.cpu_isa(), C.cpu_has_avx512f())"
    for forced in (None, "own"):  # (MOE_CPU_GEMM=aten: the A/B benchmarks' switch, checked in BENCHMARKS runs)
        run_env = env if forced is None else {**env, "MOE_CPU_GEMM": forced}
        gemm, isa, avx512 = subprocess.run([sys.executable, "-c", code], env=run_env, cwd=ROOT, check=True,
                                           capture_output=True, text=True).stdout.split()
        own_possible = isa == "avx2"  # the AVX2 kernels carry the own GEMM (the CPU has AVX2 + FMA)
        wanted = forced == "own" or (forced is None and avx512 == "False")
        assert gemm == ("own" if own_possible and wanted else "aten"), (forced, isa, avx512)


@needs_ext
def test_routed_swiglu_rejects_a_bad_index():
    """A routing index that is not one-to-one onto the counted rows, or mismatched shapes: one clear error."""
    x, index, gates, w13, w2 = _routed_inputs("k = E", 4, 3, torch.float32)
    dest, counts, n = index.dest_rows, index.tokens_per_expert, index.num_rows
    op = torch.ops.moe.routed_swiglu
    twice = dest.clone()
    twice[0, 0] = twice[1, 0]
    outside = dest.clone()
    outside[0, 0] = n
    for bad in (twice, outside):
        with pytest.raises(RuntimeError, match="one to one onto the rows"):
            op(x, bad, gates, w13, w2, counts, n)
    with pytest.raises(RuntimeError, match="counts sum to"):
        op(x, dest, gates, w13, w2, counts + 1, n)
    with pytest.raises(RuntimeError, match="gate_weights must be floating"):
        op(x, dest, gates[:, :2], w13, w2, counts, n)
    with pytest.raises(RuntimeError, match="a row per token of x"):
        op(x[:-1], dest, gates, w13, w2, counts, n)


@needs_ext
def test_experts_route_only_where_forward_would_run_the_compiled_op():
    """Experts.forward_routed equals permute -> forward -> unpermute with the extension on CPU, and
    declines (None: the layer permutes) with the reference backend, under autocast, while hooks wrap
    forward (the expert-parallel exchange), or with a virtual expert of unused slots (E + 1 counts)."""
    x, index, gates, _, _ = _routed_inputs("capacity drops", 16, 8, torch.float32)
    ext = Experts(6, 16, 8, 0.02, 0.02, impl="auto", backend="extension")
    want = ops.unpermute(ext(ops.permute(x, index, backend="extension"), index.tokens_per_expert), index, gates,
                         backend="extension")
    torch.testing.assert_close(ext.forward_routed(x, index, gates), want)
    ref = Experts(6, 16, 8, 0.02, 0.02, impl="auto", backend="reference")
    assert ref.forward_routed(x, index, gates) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ext.forward_routed(x, index, gates) is None
    handle = ext.register_forward_pre_hook(lambda module, args: None)
    assert ext.forward_routed(x, index, gates) is None
    handle.remove()
    assert ext.forward_routed(x, index, gates) is not None
    virtual = ops.build_routing_index(torch.full((16, 2), 6).scatter(1, torch.zeros(16, 1, dtype=torch.long), 1), 7,
                                      None, None, backend="extension")
    assert ext.forward_routed(x, virtual, gates[:, :2]) is None
