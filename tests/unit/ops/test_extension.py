"""The compiled dispatch ops (moe._C, backend="extension": moe/ops/extension.py) against the PyTorch
reference (moe/ops/reference.py): results, gradients, fake kernels and torch.compile, and the build
(the extension's absence, its first load inside torch.compile, the CUDA sources).

Tests that need the built extension skip when it is not built; the nvcc test compiles every
moe/csrc/*.cu for sm_90 (skipped only when nvcc is absent) so the CUDA kernels never rot.
MOE_TEST_DEVICE=cuda runs the op tests on the GPU instead (benchmarks/gpu_check.sh does); the tests
of CPU-only machinery (instruction-set variants, the build) then skip.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe import ops
from moe.ops.reference import build_routing_index_reference, permute_reference, unpermute_reference
from tests.helpers import DEVICE, ROOT, assert_cpu_isa_variants_identical

CSRC = os.path.join(ROOT, "moe", "csrc")
HAVE_EXT = DEVICE.type in ops.extension_devices()
needs_ext = pytest.mark.skipif(
    not HAVE_EXT, reason=f"moe._C is not built with {DEVICE.type} kernels: run `.venv/bin/pip install "
                         "--no-build-isolation -e .`")
cpu_only = pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU-only machinery")
EXT = "extension"


# ------------------------------------------------------------------------------------------ cases

def _case(name, seed=0):
    """(expert_indices [T, k], num_experts, capacity, priority) for a named edge case, on DEVICE."""
    ei, E, cap, pr = _cpu_case(name, seed)
    return ei.to(DEVICE), E, cap, None if pr is None else pr.to(DEVICE)


def _cpu_case(name, seed=0):
    g = torch.Generator().manual_seed(seed)

    def uniform(T, k, E):  # k distinct experts per token, like top-k
        return torch.rand(T, E, generator=g).argsort(dim=1)[:, :k].contiguous()

    def prio(T, k):
        return torch.rand(T, k, generator=g)

    if name == "uniform":
        return uniform(64, 2, 8), 8, None, None
    if name == "one_expert":  # every token on expert 3
        return torch.full((40, 1), 3), 8, None, None
    if name == "one_expert_cap":
        return torch.full((40, 1), 7), 8, 5, prio(40, 1)
    if name == "same_expert_twice":  # both slots of a token on the same expert
        return torch.full((16, 2), 2), 4, 9, None
    if name == "empty_experts":  # only experts 1 and 4 of 8 get tokens
        return torch.tensor([1, 4])[torch.randint(0, 2, (48, 2), generator=g)], 8, None, None
    if name == "k_eq_E":
        return uniform(24, 6, 6), 6, None, None
    if name == "k_eq_E_cap":
        return uniform(24, 6, 6), 6, 7, prio(24, 6)
    if name == "cap_position":
        return uniform(100, 2, 4), 4, 30, None
    if name == "cap_priority":
        return uniform(100, 2, 4), 4, 30, prio(100, 2)
    if name == "cap_priority_ties":  # few distinct values, +-0.0 and NaN: ties go to the earliest token
        p = torch.tensor([0.0, -0.0, 0.5, 1.0, float("nan")])[torch.randint(0, 5, (100, 2), generator=g)]
        return uniform(100, 2, 4), 4, 20, p
    if name == "cap_priority_bf16":
        return uniform(100, 2, 4), 4, 25, prio(100, 2).to(torch.bfloat16)
    if name == "cap_zero":
        return uniform(20, 2, 4), 4, 0, prio(20, 2)
    if name == "cap_large":
        return uniform(20, 2, 4), 4, 1000, prio(20, 2)
    if name == "skewed_cap_priority":  # 90% of the pairs on expert 0
        ei = torch.where(torch.rand(300, 2, generator=g) < 0.9, 0, torch.randint(1, 8, (300, 2), generator=g))
        return ei, 8, 60, prio(300, 2)
    if name == "T1":
        return torch.tensor([[2, 0]]), 4, None, None
    if name == "T1_cap":
        return torch.tensor([[1, 1, 2]]), 3, 1, torch.tensor([[0.1, 0.9, 0.5]])
    if name == "int32":
        return uniform(50, 3, 5).int(), 5, 20, None
    if name == "T0":
        return torch.zeros(0, 2, dtype=torch.long), 4, 3, torch.zeros(0, 2)
    if name == "large":  # several chunks in the parallel counting sort
        return uniform(40000, 2, 16), 16, None, None
    if name == "large_cap_position":
        return uniform(40000, 2, 16), 16, 4500, None
    if name == "large_cap_priority":
        return uniform(40000, 2, 16), 16, 4500, prio(40000, 2)
    raise KeyError(name)


INDEX_CASES = ["uniform", "one_expert", "one_expert_cap", "same_expert_twice", "empty_experts", "k_eq_E",
               "k_eq_E_cap", "cap_position", "cap_priority", "cap_priority_ties", "cap_priority_bf16", "cap_zero",
               "cap_large", "skewed_cap_priority", "T1", "T1_cap", "int32", "T0", "large", "large_cap_position",
               "large_cap_priority"]
DATA_CASES = [c for c in INDEX_CASES if not c.startswith("large")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _index(name, backend):
    ei, E, cap, pr = _case(name)
    return ops.build_routing_index(ei, E, cap, pr, backend=backend)


def _assert_index_equal(a, b):
    assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)
    assert torch.equal(a.dest_rows, b.dest_rows)
    assert torch.equal(a.source_tokens, b.source_tokens)
    assert a.num_rows == b.num_rows and a.num_dropped == b.num_dropped
    assert a.tokens_per_expert.dtype == a.dest_rows.dtype == a.source_tokens.dtype == torch.long


# ---------------------------------------------------------------------------------- routing index

@needs_ext
@pytest.mark.parametrize("name", INDEX_CASES)
def test_routing_index_matches_reference(name):
    ei, E, cap, pr = _case(name)
    ref = build_routing_index_reference(ei, E, cap, pr)
    ext = ops.build_routing_index(ei, E, cap, pr, backend=EXT)
    _assert_index_equal(ext, ref)
    assert isinstance(ext.num_rows, int) and isinstance(ext.num_dropped, int)


@needs_ext
@pytest.mark.parametrize("seed", range(5))
def test_routing_index_random(seed):
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(1, 2000, (1,), generator=g))
    E = int(torch.randint(1, 40, (1,), generator=g))
    k = int(torch.randint(1, E + 1, (1,), generator=g))
    ei = torch.randint(0, E, (T, k), generator=g).to(DEVICE)  # duplicates within a token allowed
    pr = torch.rand(T, k, generator=g).mul(8).floor().to(DEVICE) if seed % 2 else None  # many ties
    for cap in (None, 0, 1, max(1, T * k // E // 2), T * k):
        ref = build_routing_index_reference(ei, E, cap, pr)
        _assert_index_equal(ops.build_routing_index(ei, E, cap, pr, backend=EXT), ref)


@needs_ext
def test_routing_index_rejects_bad_experts():
    # on CUDA a dropless index is built without a host sync and reports bad indices with a device-side
    # assert (test_dropless_routing_index_on_cuda_asserts_on_bad_experts); a capacity that can drop syncs
    # and raises here, on every device
    for cap in ((1, None) if DEVICE.type == "cpu" else (1,)):
        with pytest.raises(RuntimeError, match="expert index"):
            ops.build_routing_index(torch.tensor([[0, 4]], device=DEVICE), 4, cap, backend=EXT)
        with pytest.raises(RuntimeError, match="expert index"):
            ops.build_routing_index(torch.tensor([[-1, 0]], device=DEVICE), 4, cap, backend=EXT)


_BAD_EXPERT_CUDA_CODE = """\
import torch, moe.ops as o
idx = o.build_routing_index(torch.tensor([[0, 9]], device='cuda'), 4, backend='extension')
torch.cuda.synchronize()
print('no error')
"""


@pytest.mark.skipif(DEVICE.type != "cuda" or not HAVE_EXT, reason="a CUDA device and moe._C's CUDA kernels")
def test_dropless_routing_index_on_cuda_asserts_on_bad_experts():
    """Without a host sync a bad expert index ends the process with a device-side assert that names the
    op (a subprocess: the assert leaves its CUDA context unusable)."""
    proc = subprocess.run([sys.executable, "-c", _BAD_EXPERT_CUDA_CODE], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "no error" not in out, out[-3000:]
    assert "routing_index" in out and "device-side assert" in out, out[-3000:]


# -------------------------------------------------------------------------- permute / unpermute

def _data(index, T, d, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(DEVICE, dtype)
    y = torch.randn(index.num_rows, d, generator=g).to(DEVICE, dtype)
    w = torch.rand(*index.dest_rows.shape, generator=g).to(DEVICE)
    gout = torch.randn(T, d, generator=g).to(DEVICE, dtype)
    gperm = torch.randn(index.num_rows, d, generator=g).to(DEVICE, dtype)
    return x, y, w, gout, gperm


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", DATA_CASES)
def test_permute_unpermute_match_reference(name, dtype):
    index = _index(name, EXT)
    T = index.dest_rows.shape[0]
    x, y, w, gout, gperm = _data(index, T, 24, dtype)
    tol = TOL[dtype]

    out, (gx,) = _grads(lambda a: ops.permute(a, index, backend=EXT), [x], gperm)
    ref, (gx_ref,) = _grads(lambda a: permute_reference(a, index), [x], gperm)
    assert out.dtype == dtype and torch.equal(out, ref)  # a copy: exact
    torch.testing.assert_close(gx, gx_ref, **tol)

    out, (gy, gw) = _grads(lambda a, b: ops.unpermute(a, index, b, backend=EXT), [y, w], gout)
    if index.num_rows == 0:  # everything dropped: the reference cannot index an empty y
        ref, gy_ref, gw_ref = torch.zeros_like(gout), torch.zeros_like(y), torch.zeros_like(w)
    else:
        ref, (gy_ref, gw_ref) = _grads(lambda a, b: unpermute_reference(a, index, b), [y, w], gout)
    assert out.dtype == dtype and gw.dtype == w.dtype
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(gy, gy_ref, **tol)
    # grad_w is a d-long dot product: the reference rounds it to `dtype`
    torch.testing.assert_close(gw, gw_ref, rtol=tol["rtol"], atol=tol["atol"] * 8)


@needs_ext
@pytest.mark.parametrize("layout", ["row_strided", "col_strided", "transposed", "expanded"])
def test_strided_inputs(layout):
    index = _index("cap_priority", EXT)
    T, d = index.dest_rows.shape[0], 32
    g = torch.Generator().manual_seed(3)

    def strided(rows):
        base = torch.randn(2 * rows, 2 * d, generator=g).to(DEVICE)
        if layout == "row_strided":
            return base[::2, :d]
        if layout == "col_strided":
            return base[:rows, ::2]
        if layout == "transposed":
            return torch.randn(d, rows, generator=g).to(DEVICE).t()
        return base[:1, :d].expand(rows, d)

    x, y, gout = strided(T), strided(index.num_rows), strided(T)
    w = torch.rand(T * 2, 2, generator=g).to(DEVICE)[::2]  # non-contiguous gate weights too
    assert not x.is_contiguous()
    torch.testing.assert_close(ops.permute(x, index, backend=EXT), permute_reference(x, index), rtol=0, atol=0)
    out, (gy, gw) = _grads(lambda a, b: ops.unpermute(a, index, b, backend=EXT), [y, w], gout)
    ref, (gy_ref, gw_ref) = _grads(lambda a, b: unpermute_reference(a, index, b), [y, w], gout)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gy, gy_ref)
    torch.testing.assert_close(gw, gw_ref)
    # strided incoming gradients, straight into the backward ops
    gperm = strided(index.num_rows)
    torch.testing.assert_close(torch.ops.moe.unpermute(gperm, index.dest_rows, None),
                               unpermute_reference(gperm, index, torch.ones(T, 2, device=DEVICE)))
    gy2, gw2 = torch.ops.moe.unpermute_backward(gout, y, index.dest_rows, w)
    torch.testing.assert_close(gy2, gy_ref)
    torch.testing.assert_close(gw2, gw_ref)


@needs_ext
def test_multidim_rows():
    index = _index("cap_priority", EXT)
    x = torch.randn(index.dest_rows.shape[0], 3, 5, device=DEVICE)
    torch.testing.assert_close(ops.permute(x, index, backend=EXT), permute_reference(x, index), rtol=0, atol=0)


@needs_ext
def test_gradcheck_float64():
    index = _index("cap_priority", EXT)  # has drops
    small = _index("k_eq_E_cap", EXT)
    for idx in (index, small):
        T = idx.dest_rows.shape[0]
        x = torch.randn(T, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
        y = torch.randn(idx.num_rows, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
        w = torch.rand(T, idx.dest_rows.shape[1], dtype=torch.float64, device=DEVICE, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a: ops.permute(a, idx, backend=EXT), (x,))
        assert torch.autograd.gradcheck(lambda a, b: ops.unpermute(a, idx, b, backend=EXT), (y, w))
        assert torch.autograd.gradgradcheck(lambda a: ops.permute(a, idx, backend=EXT), (x,))
        assert torch.autograd.gradcheck(lambda a: torch.ops.moe.unpermute(a, idx.dest_rows, None), (y,))


@needs_ext
def test_bitwise_deterministic():
    ei, E, cap, pr = _case("large_cap_priority")
    d = 64

    def run():
        idx = ops.build_routing_index(ei, E, cap, pr, backend=EXT)
        g = torch.Generator().manual_seed(5)
        x = torch.randn(ei.shape[0], d, generator=g).to(DEVICE).requires_grad_()
        w = torch.rand(*ei.shape, generator=g).to(DEVICE).requires_grad_()
        h = ops.permute(x, idx, backend=EXT)
        out = ops.unpermute(h * 1.5 + 0.25, idx, w, backend=EXT)
        out.backward(torch.randn(out.shape, generator=g).to(DEVICE))
        return [idx.dest_rows, idx.source_tokens, h, out, x.grad, w.grad]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@needs_ext
@cpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_isa_variants_identical(dtype):
    """The baseline and AVX2 builds of the CPU row kernels give bitwise identical results."""
    index = _index("skewed_cap_priority", EXT)
    x, y, w, gout, gperm = _data(index, index.dest_rows.shape[0], 200, dtype)  # 200: a partial block

    def run():
        out, (gy, gw) = _grads(lambda a, b: ops.unpermute(a, index, b, backend=EXT), [y, w], gout)
        px, (gx,) = _grads(lambda a: ops.permute(a, index, backend=EXT), [x], gperm)
        return [out, gy, gw, px, gx]

    assert_cpu_isa_variants_identical(run)


@needs_ext
@cpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row_bytes", [4000, 8192, 8200])
def test_unpermute_backward_both_row_paths(dtype, row_bytes):
    """unpermute's backward takes whole rows up to 8 KiB and blocks of wider rows (moe/csrc/
    dispatch_cpu_kernels.h): both against the reference, with dropped slots, in every ISA build."""
    index = _index("skewed_cap_priority", EXT)
    d = row_bytes // dtype.itemsize
    _, y, w, gout, _ = _data(index, index.dest_rows.shape[0], d, dtype)

    def run():
        return _grads(lambda a, b: ops.unpermute(a, index, b, backend=EXT), [y, w], gout)[1]

    gy, gw = run()
    ry, rw = _grads(lambda a, b: unpermute_reference(a, index, b), [y.double(), w.double()], gout.double())[1]
    torch.testing.assert_close(gy, ry.to(dtype), **TOL[dtype])
    # grad_w comes back in the gate weights' dtype (float32 here): dot products of 500-4100 terms
    tol = TOL[dtype] if dtype in (torch.bfloat16, torch.float16) else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), rw, rtol=tol["rtol"], atol=tol["atol"] * d ** 0.5)
    assert_cpu_isa_variants_identical(run)


@needs_ext
@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("row_bytes", [512, 8200])
def test_unpermute_backward_rows_no_slot_reads(dtype, row_bytes):
    """y may hold rows that no (token, slot) reads (dest_rows only has to stay below y's row count): their
    gradient is zero, as the reference's, in both row paths; the other rows are unchanged."""
    index = _index("skewed_cap_priority", EXT)
    d = row_bytes // dtype.itemsize
    _, y, w, gout, _ = _data(index, index.dest_rows.shape[0], d, dtype)
    extra = torch.randn(5, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    y_more = torch.cat([y, extra])
    dirty = torch.full_like(y_more, 3.0)  # freed memory the allocator may hand to grad_y
    del dirty
    gy, gw = _grads(lambda a, b: ops.unpermute(a, index, b, backend=EXT), [y_more, w], gout)[1]
    ry, rw = _grads(lambda a, b: unpermute_reference(a, index, b), [y_more, w], gout)[1]
    assert torch.equal(gy[index.num_rows:], torch.zeros_like(extra))
    torch.testing.assert_close(gy, ry, **TOL[dtype])
    # grad_w: dot products of d terms, summed in another order than the reference's
    torch.testing.assert_close(gw, rw, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * d ** 0.5)
    base_gy, base_gw = _grads(lambda a, b: ops.unpermute(a, index, b, backend=EXT), [y, w], gout)[1]
    assert torch.equal(gy[:index.num_rows], base_gy) and torch.equal(gw, base_gw)


@needs_ext
@cpu_only
@pytest.mark.parametrize("row_bytes", [512, 4096])  # 4096: an output over 16 MiB, the streaming path
def test_permute_rows_no_slot_writes_are_zero(row_bytes):
    """permute's output may have more rows than (token, slot) pairs write: those rows are zero, the others
    are their token's row, in both walks of moe/csrc/dispatch_cpu_kernels.h `permute_rows`."""
    index = _index("skewed_cap_priority", EXT)
    T, d = index.dest_rows.shape[0], row_bytes // 4
    extra = 4200 - index.num_rows if row_bytes == 4096 else 5
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(3))
    dirty = torch.full((index.num_rows + extra, d), 3.0)  # freed memory the allocator may hand out
    del dirty
    out = torch.ops.moe.permute(x, index.dest_rows, index.num_rows + extra)
    assert torch.equal(out[:index.num_rows], x.index_select(0, index.source_tokens))
    assert torch.equal(out[index.num_rows:], torch.zeros(extra, d))


# ------------------------------------------------------------------ property tests (hypothesis)

@st.composite
def _routings(draw):
    """(expert_indices [T, k], E, capacity, priority) on the CPU: any E, k <= E, T >= 0; top-k-like
    distinct experts or repeats skewed towards expert 0; dropless or a capacity (0 included) with
    the position policy, a priority, or a priority with many ties."""
    E = draw(st.integers(1, 10))
    k = draw(st.integers(1, E))
    T = draw(st.integers(0, 160))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 32 - 1)))
    if draw(st.booleans()):
        ei = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]
    else:
        skew = draw(st.floats(0, 1))
        ei = torch.where(torch.rand(T, k, generator=g) < skew, 0, torch.randint(0, E, (T, k), generator=g))
    cap = draw(st.one_of(st.none(), st.integers(0, max(1, 2 * T * k // E))))
    pr = None
    if cap is not None and draw(st.booleans()):
        pr = torch.rand(T, k, generator=g)
        if draw(st.booleans()):
            pr = (pr * 4).floor()
    return ei.contiguous(), E, cap, pr


@needs_ext
@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(routing=_routings(), d=st.integers(1, 48), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 999))
def test_dispatch_ops_match_the_fp64_reference_on_any_routing(routing, d, dtype, seed):
    """For any routing, row width and dtype: the routing index equals the reference's, permute is an
    exact copy, and unpermute and both backwards agree with the fp64 reference on the same (rounded)
    inputs to within their rounding: a sum of n products in the accumulation type (fp32, fp64 for
    fp64) is off by at most (n + 1) of its roundings of the sum of the terms' magnitudes, plus one
    rounding of the result dtype (absolute below its normal range)."""
    ei, E, cap, pr = (t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in routing)
    idx = ops.build_routing_index(ei, E, cap, pr, backend=EXT)
    _assert_index_equal(idx, build_routing_index_reference(ei, E, cap, pr))
    T, k = ei.shape
    x, y, w, gout, gperm = _data(idx, T, d, dtype, seed)
    w = w.to(dtype).to(w.dtype)  # the ops round the gate weights to y's dtype: compare on rounded ones
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps

    def within(got, want, magnitude, terms):
        """|got - want| <= ((terms + 1) acc_eps + eps(got)) * magnitude + the subnormal step of got."""
        fin = torch.finfo(got.dtype)
        err = (got.double() - want).abs()
        limit = ((terms + 1) * acc_eps + fin.eps) * magnitude + fin.tiny * fin.eps
        assert bool((err <= limit).all()), f"max error {err.max():.3e} ({got.dtype}, {terms} terms)"

    # permute: a copy, and its backward a sum of the kept rows' gradients (up to k per token)
    out, (gx,) = _grads(lambda a: ops.permute(a, idx, backend=EXT), [x], gperm)
    assert torch.equal(out, permute_reference(x, idx))
    _, (gx_ref,) = _grads(lambda a: permute_reference(a, idx), [x.double()], gperm.double())
    _, (gx_abs,) = _grads(lambda a: permute_reference(a, idx), [x.double()], gperm.double().abs())
    within(gx, gx_ref, gx_abs, k)

    out, (gy, gw) = _grads(lambda a, b: ops.unpermute(a, idx, b, backend=EXT), [y, w], gout)
    if idx.num_rows == 0:  # everything dropped: zeros (the reference cannot index an empty y)
        assert not out.any() and not gy.numel() and not gw.any()
        return
    ref, (gy_ref, gw_ref) = _grads(lambda a, b: unpermute_reference(a, idx, b), [y.double(), w.double()],
                                   gout.double())
    within(out, ref, unpermute_reference(y.double().abs(), idx, w.double().abs()), k)  # k weighted rows
    within(gy, gy_ref, gy_ref.abs(), 1)  # w * grad_out
    _, (_, gw_abs) = _grads(lambda a, b: unpermute_reference(a, idx, b), [y.double().abs(), w.double()],
                            gout.double().abs())
    within(gw, gw_ref, gw_abs, d)  # <grad_out, y>: d products


# --------------------------------------------------------------------------------- torch.compile

@needs_ext
def test_torch_compile_permute_unpermute():
    torch._dynamo.reset()
    index = _index("cap_priority", EXT)
    T, d = index.dest_rows.shape[0], 16

    def f(x, w, idx):
        h = ops.permute(x, idx, backend=EXT)
        return ops.unpermute(torch.tanh(h), idx, w, backend=EXT)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(T, d, device=DEVICE, requires_grad=True)
    w = torch.rand(T, 2, device=DEVICE, requires_grad=True)
    out_c = compiled(x, w, index)
    gx_c, gw_c = torch.autograd.grad(out_c.square().sum(), (x, w))
    out_e = f(x, w, index)
    gx_e, gw_e = torch.autograd.grad(out_e.square().sum(), (x, w))
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(gx_c, gx_e)
    torch.testing.assert_close(gw_c, gw_e)


@needs_ext
def test_torch_compile_routing_index_in_graph():
    """The data-dependent kept-row count is an unbacked SymInt in the fake kernel."""
    torch._dynamo.reset()
    ei, E, cap, pr = _case("cap_priority")

    def f(x, w, ei, pr):
        idx = ops.build_routing_index(ei, E, cap, pr, backend=EXT)
        return ops.unpermute(ops.permute(x, idx, backend=EXT) * 2, idx, w, backend=EXT), idx.tokens_per_expert

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(ei.shape[0], 8, device=DEVICE, requires_grad=True)
    w = torch.rand(*ei.shape, device=DEVICE, requires_grad=True)
    out_c, tpe_c = compiled(x, w, ei, pr)
    out_e, tpe_e = f(x, w, ei, pr)
    torch.testing.assert_close(out_c, out_e)
    assert torch.equal(tpe_c, tpe_e)
    gx_c, gw_c = torch.autograd.grad(out_c.sum(), (x, w))
    gx_e, gw_e = torch.autograd.grad(out_e.sum(), (x, w))
    torch.testing.assert_close(gx_c, gx_e)
    torch.testing.assert_close(gw_c, gw_e)


@needs_ext
def test_opcheck():
    """torch.library.opcheck: schema, autograd registration, fake kernels, AOT dispatch (dynamic)."""
    ei, E, cap, pr = _case("cap_priority")
    idx = ops.build_routing_index(ei, E, cap, pr, backend=EXT)
    T = ei.shape[0]
    x = torch.randn(T, 8, device=DEVICE, requires_grad=True)
    y = torch.randn(idx.num_rows, 8, device=DEVICE, requires_grad=True)
    w = torch.rand(T, 2, device=DEVICE, requires_grad=True)
    cases = [("routing_index", (ei, E, cap, pr)), ("routing_index", (ei, E, None, None)),
             ("permute", (x, idx.dest_rows, idx.num_rows)), ("unpermute", (y, idx.dest_rows, w)),
             ("unpermute", (y, idx.dest_rows, None)),
             ("unpermute_backward", (torch.randn(T, 8, device=DEVICE), y.detach(), idx.dest_rows, w.detach()))]
    for name, args in cases:
        result = torch.library.opcheck(getattr(torch.ops.moe, name).default, args)
        assert all(v == "SUCCESS" for v in result.values()), (name, result)


@needs_ext
@cpu_only
def test_meta_tensors():
    idx = _index("cap_priority", EXT)
    x = torch.empty(idx.dest_rows.shape[0], 7, device="meta")
    assert ops.permute(x, idx, backend=EXT).shape == (idx.num_rows, 7)
    y = torch.empty(idx.num_rows, 7, device="meta")
    assert ops.unpermute(y, idx, torch.empty(idx.dest_rows.shape, device="meta"), backend=EXT).shape == x.shape


# ------------------------------------------------------- external processes: subprocesses, nvcc, g++
#
# The slow checks that run other processes are started together, on first use, and run concurrently.

_NO_EXT_CODE = """\
import sys; sys.modules['moe._C'] = None
import torch, moe.ops as o
assert not o.extension_available() and o.dispatch_backend('auto') == 'reference'
assert o.extension_devices() == ()
i = o.build_routing_index(torch.tensor([[0, 1]]), 2, backend=o.dispatch_backend('auto'))
assert o.permute(torch.ones(1, 3), i).shape == (2, 3)
try:
    o.dispatch_backend('extension')
except RuntimeError as e:
    print('ok', e)
"""

_FIRST_USE_IN_COMPILE_CODE = """\
import torch, moe.ops as o, moe.ops.extension as ext
ei = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]])
def f(x, w):
    idx = o.build_routing_index(ei, 3, 2, None, backend='extension')
    return o.unpermute(o.permute(x, idx, backend='extension'), idx, w, backend='extension')
c = torch.compile(f, fullgraph=True, backend='aot_eager')
x, w = torch.randn(4, 5), torch.rand(4, 2)
assert ext._EXT is None
out = c(x, w)
torch.testing.assert_close(out, f(x, w))
print('ok')
"""


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = os.path.join(home, "bin", "nvcc")
    return cand if os.path.exists(cand) else None


def _cuda_include(nvcc):
    for root in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
                 os.environ.get("CUDA_HOME", "/usr/local/cuda")):
        if os.path.exists(os.path.join(root, "include", "cuda_runtime_api.h")):
            return os.path.join(root, "include")
    return None


CU_FILES = sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))


class _Job:
    def __init__(self, cmd, env=None, skip=None):
        self.cmd, self.skip = cmd, skip
        self.proc = None if skip else subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                       stderr=subprocess.PIPE, text=True)

    def result(self):
        if self.skip:
            pytest.skip(self.skip)
        out, err = self.proc.communicate(timeout=300)
        return self.proc.returncode, out, err


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("nvcc")
    started = {
        "no_ext": _Job([sys.executable, "-c", _NO_EXT_CODE], env=dict(os.environ, MOE_DISPATCH="")),
        "first_use": _Job([sys.executable, "-c", _FIRST_USE_IN_COMPILE_CODE],
                          skip=None if HAVE_EXT else "moe._C is not built"),
    }
    nvcc = _nvcc()
    for cu in CU_FILES:  # compile every .cu for sm_90 (skipped only when nvcc is absent)
        cmd = [nvcc or "nvcc", "-arch=sm_90", "-std=c++17", "-O3", "-c", os.path.join(CSRC, cu), "-o",
               str(out_dir / (cu + ".o"))]
        started["nvcc:" + cu] = _Job(cmd, skip=None if nvcc else "nvcc is not installed")
    # the torch binding of the CUDA kernels (built only with a CUDA torch): syntax check against this
    # torch's headers and the CUDA toolkit's
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    torch_inc = os.path.join(os.path.dirname(torch.__file__), "include")
    cuda_inc = _cuda_include(nvcc) if nvcc else None
    skip = None
    if cxx is None or cuda_inc is None:
        skip = "needs a C++ compiler and the CUDA toolkit's headers"
    elif not os.path.exists(os.path.join(torch_inc, "c10", "cuda", "CUDAStream.h")):
        skip = "this torch ships no c10/cuda headers"
    started["binding"] = _Job([cxx or "c++", "-std=c++20", "-fsyntax-only", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
                               "-I", torch_inc, "-I", os.path.join(torch_inc, "torch", "csrc", "api", "include"),
                               "-I", cuda_inc or ".", os.path.join(CSRC, "dispatch_cuda.cpp")], skip=skip)
    yield started, out_dir
    for job in started.values():
        if job.proc is not None and job.proc.poll() is None:
            job.proc.kill()


@needs_ext
def test_extension_devices_name_the_kernels():
    devices = ops.extension_devices()
    assert DEVICE.type in devices and "cpu" in devices and set(devices) <= {"cpu", "cuda"}


@cpu_only
def test_import_without_extension(jobs):
    """`import moe.ops` and the reference path work when moe._C cannot be imported."""
    rc, out, err = jobs[0]["no_ext"].result()
    assert rc == 0 and out.startswith("ok"), out + err[-3000:]


@needs_ext
@cpu_only
def test_first_use_inside_torch_compile(jobs):
    """moe._C may be loaded for the first time while Dynamo traces (fullgraph)."""
    rc, out, err = jobs[0]["first_use"].result()
    assert rc == 0 and out.strip().endswith("ok"), out + err[-3000:]


@cpu_only
@pytest.mark.parametrize("cu", CU_FILES)
def test_cuda_kernels_compile(cu, jobs):
    """`nvcc -arch=sm_90 -c` on each moe/csrc/*.cu (no CUDA torch needed), so the kernels never rot."""
    job = jobs[0]["nvcc:" + cu]
    rc, out, err = job.result()
    assert rc == 0, f"{' '.join(job.cmd)}\n{out}\n{err[-5000:]}"
    assert (jobs[1] / (cu + ".o")).stat().st_size > 0


@cpu_only
def test_cuda_binding_compiles(jobs):
    """Syntax check of dispatch_cuda.cpp, the torch binding of the CUDA kernels."""
    job = jobs[0]["binding"]
    rc, out, err = job.result()
    assert rc == 0, f"{' '.join(job.cmd)}\n{err[-5000:]}"
