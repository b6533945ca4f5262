import pytest
import torch

from moe.experts import EXPERT_IMPLS, _GroupedSwiGLU, swiglu


def reference(x, w13, w2, counts):
    outs, start = [], 0
    for e, c in enumerate(counts):
        xe = x[start:start + c]
        outs.append(swiglu(xe @ w13[e].t()) @ w2[e].t())
        start += c
    return torch.cat(outs)


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [9, 0, 0, 0], [0, 0, 0, 1], [2, 2, 2, 2]])
@pytest.mark.parametrize("impl", ["loop", "padded"])
def test_expert_impls_match_reference_forward_and_backward(impl, counts):
    torch.manual_seed(0)
    n = sum(counts)
    x = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    w13 = torch.randn(4, 8, 6, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 6, 4, dtype=torch.float64, requires_grad=True)
    out = EXPERT_IMPLS[impl](x, w13, w2, counts)
    ref = reference(x, w13, w2, counts)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w13, w2), g)
    want = torch.autograd.grad(ref, (x, w13, w2), g, allow_unused=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b)


def test_grouped_swiglu_gradcheck():
    torch.manual_seed(0)
    counts = [2, 0, 3]
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w13 = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: _GroupedSwiGLU.apply(a, b, c, counts), (x, w13, w2))
