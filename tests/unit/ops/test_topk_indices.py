"""The routers' top-k selection, `moe.ops.topk_indices`: the compiled CPU kernel (moe/csrc/router_cpu.cpp)
against torch.topk (the reference) and, where torch.topk leaves the order open (equal scores), against a
stable descending sort; its fake kernel, opcheck and torch.compile; and a router using it."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe import ops
from tests.helpers import router

HAVE_EXT = "cpu" in ops.extension_devices()
needs_ext = pytest.mark.skipif(not HAVE_EXT, reason="moe._C is not built: run `.venv/bin/pip install "
                                                    "--no-build-isolation -e .`")
EXT = "extension"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The order the kernel promises: descending, equal scores by index, NaN first (as torch.sort)."""
    return torch.sort(scores.double(), dim=-1, descending=True, stable=True).indices[:, :k]


def expert_major(scores: torch.Tensor) -> torch.Tensor:
    """The same [T, E] values laid out as the routers' softmax leaves them: the transpose of a contiguous
    [E, T] (the compiled op's vector path for fp32, k <= 16)."""
    return scores.t().contiguous().t()


LAYOUTS = {"rows": lambda s: s, "expert-major": expert_major}


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,k", [(1, 1), (8, 2), (64, 8), (128, 8), (256, 8), (16, 16), (7, 3), (40, 20)])
def test_equals_torch_topk_on_distinct_scores(E, k, dtype, layout):
    g = torch.Generator().manual_seed(E * 31 + k)
    # distinct integers below 257 are exact in every dtype here, so torch.topk's answer is unique
    scores = LAYOUTS[layout](torch.stack([torch.randperm(E, generator=g) for _ in range(300)]).to(dtype) / 4)
    got = ops.topk_indices(scores, k, backend=EXT)
    assert got.dtype == torch.long and got.shape == (300, k)
    assert torch.equal(got, torch.topk(scores, k, dim=-1).indices)
    assert torch.equal(got, ops.topk_indices(scores, k, backend="reference"))


@needs_ext
def test_router_scores():
    """Softmax router scores of 2,048 tokens over 64 and 128 experts, in both layouts: torch.topk's indices
    exactly."""
    for E in (64, 128):
        logits = torch.randn(E, 2048, generator=torch.Generator().manual_seed(E))
        for scores in (logits.t().softmax(-1), logits.softmax(0).t()):  # rows; expert-major (the routers')
            assert torch.equal(ops.topk_indices(scores, 8, backend=EXT), torch.topk(scores, 8).indices)


@needs_ext
def test_ties_nan_and_infinities_in_a_stable_order():
    rows = torch.tensor([
        [1.0, 1.0, 1.0, 1.0, 1.0],
        [0.0, 2.0, 2.0, -1.0, 2.0],
        [float("nan"), 1.0, float("nan"), float("inf"), 0.0],
        [float("-inf"), float("-inf"), 3.0, float("-inf"), float("-inf")],
        [-0.0, 0.0, -0.0, 0.5, 0.0],
    ])
    want = [[0, 1, 2, 3], [1, 2, 4, 0], [0, 2, 3, 1], [2, 0, 1, 3], [3, 0, 1, 2]]
    got = ops.topk_indices(rows, 4, backend=EXT)
    assert got.tolist() == want
    assert torch.equal(got, stable_topk(rows, 4))
    many = rows.repeat(5, 1)  # 25 tokens: whole vectors of tokens and a tail, expert-major
    assert ops.topk_indices(expert_major(many), 4, backend=EXT).tolist() == want * 5


@needs_ext
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(0, 40), E=st.integers(1, 40), data=st.data(), levels=st.integers(1, 6),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(sorted(LAYOUTS)))
def test_any_shape_with_many_ties(T, E, data, levels, dtype, layout):
    """Few distinct values (many ties) in any shape and layout: the stable order, for every k from 0 to E."""
    k = data.draw(st.integers(0, E))
    g = torch.Generator().manual_seed(T * 1000 + E)
    scores = LAYOUTS[layout](torch.randint(0, levels, (T, E), generator=g).to(dtype))
    assert torch.equal(ops.topk_indices(scores, k, backend=EXT), stable_topk(scores, k))


@needs_ext
def test_strided_input_and_bad_arguments():
    scores = torch.randn(32, 16)
    assert torch.equal(ops.topk_indices(scores.t(), 3, backend=EXT), torch.topk(scores.t(), 3).indices)
    with pytest.raises(RuntimeError, match=r"topk_indices: k must be in \[0, E\] = \[0, 16\], got 17"):
        torch.ops.moe.topk_indices(scores, 17)
    with pytest.raises(RuntimeError, match="topk_indices: scores must be \\[T, E\\]"):
        torch.ops.moe.topk_indices(scores[0], 2)
    with pytest.raises(RuntimeError, match="topk_indices: scores must be floating point"):
        torch.ops.moe.topk_indices(scores.long(), 2)


@needs_ext
def test_vector_kernel_is_the_same_on_every_isa():
    """The vector kernel (4 lanes in the baseline build, 8 with AVX2) gives the same indices, in both layouts."""
    from tests.helpers import assert_cpu_isa_variants_identical

    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (203, 64), generator=g).float()  # ties; a tail of 3 tokens
    assert_cpu_isa_variants_identical(lambda: [ops.topk_indices(s, 8, backend=EXT) for s in (scores, expert_major(scores))])


@needs_ext
def test_opcheck_and_compile_fullgraph():
    scores = torch.randn(50, 12)
    result = torch.library.opcheck(torch.ops.moe.topk_indices.default, (scores, 4))
    assert all(v == "SUCCESS" for v in result.values()), result
    compiled = torch.compile(lambda s: ops.topk_indices(s.softmax(-1), 4, backend=EXT), fullgraph=True)
    assert torch.equal(compiled(scores), torch.topk(scores.softmax(-1), 4).indices)
    assert ops.topk_indices(torch.empty(9, 12, device="meta"), 4, backend=EXT).shape == (9, 4)


def test_reference_backend_and_other_shapes_use_torch_topk():
    scores = torch.randn(6, 4, 8)  # not [T, E]: torch.topk over the last dimension
    assert torch.equal(ops.topk_indices(scores, 2, backend=EXT if HAVE_EXT else "reference"),
                       torch.topk(scores, 2).indices)


@needs_ext
@pytest.mark.parametrize("name,extra", [("topk", []), ("topk", ["model.moe.n_groups=4", "model.moe.topk_groups=2"]),
                                        ("sinkhorn", []), ("topk", ["model.moe.bias_update_rate=0.01"])])
def test_routers_decide_the_same_with_either_backend(name, extra):
    """A router on the compiled selection makes the reference's decision (indices, gates, losses)."""
    decisions = []
    for backend in ("reference", EXT):
        torch.manual_seed(0)
        r = router(f"model.moe.router={name}", "model.moe.top_k=4", f"model.moe.dispatch={backend}", *extra,
                   d=32, num_experts=16)
        assert r.dispatch_backend == backend
        if r.expert_bias is not None:
            r.expert_bias.copy_(torch.linspace(-0.1, 0.1, 16))
        r.train()
        decisions.append(r(torch.randn(256, 32, generator=torch.Generator().manual_seed(1)), None, 4))
    ref, ext = decisions
    assert torch.equal(ref.expert_indices, ext.expert_indices)
    torch.testing.assert_close(ref.gate_weights, ext.gate_weights, rtol=0, atol=0)
    assert ref.losses.keys() == ext.losses.keys()
    for key in ref.losses:
        torch.testing.assert_close(ref.losses[key], ext.losses[key], rtol=0, atol=0)
