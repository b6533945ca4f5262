"""moe/nn/upcycle.py: an MoE layer upcycled from a dense SwiGLU FFN computes that FFN exactly (copy and
granular, softmax and sigmoid scores, a routed scaling factor), whatever its router's weights; the
experts do not depend on which expert-parallel rank makes them; what cannot keep the function is
refused naming the key."""
import pytest
import torch

from moe.config import ConfigError, check_fields, load_config
from moe.nn.ffn import DenseFFN
from moe.nn.moe_layer import MoELayer
from moe.nn.upcycle import expert_weights, granularity, tied_router

D, H = 16, 48


def _cfg(*overrides):
    return load_config(None, ["model.d_model=16", f"model.ffn_hidden={H}", "model.moe.num_experts=6",
                              "model.moe.renormalize=true", "model.moe.dispatch=reference", "model.init_from=x",
                              *overrides]).model


def _upcycled(m, dense):
    layer = MoELayer(D, m.moe.expert_hidden or H, m.moe, 0.02, 0.02).eval()
    g = granularity(m, H)
    w13, w2 = expert_weights(m, dense.w13.weight.detach(), dense.w2.weight.detach(), range(m.moe.num_experts), 0, 0)
    with torch.no_grad():
        layer.experts.w13.copy_(w13)
        layer.experts.w2.copy_(w2)
        layer.router.weight.normal_(std=1.0)  # a router far from uniform: the function must not depend on it
        layer.router.weight.copy_(tied_router(layer.router.weight, g))
    return layer


@pytest.mark.parametrize("overrides", [
    ["model.upcycle=copy", "model.moe.top_k=2"],
    ["model.upcycle=copy", "model.moe.top_k=1", "model.moe.routed_scaling_factor=2.5"],
    ["model.upcycle=granular", "model.moe.expert_hidden=16", "model.moe.top_k=3"],  # g = 3, 2 virtual groups
    ["model.upcycle=granular", "model.moe.expert_hidden=24", "model.moe.top_k=4", "model.moe.score_func=sigmoid"],
])
def test_the_upcycled_layer_computes_the_dense_ffn(overrides):
    torch.manual_seed(0)
    m = _cfg(*overrides)
    dense = DenseFFN(D, H, 0.3, 0.3)
    x = torch.randn(2, 7, D)
    with torch.no_grad():
        want = dense(x)
        got = _upcycled(m, dense)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(want.abs().max()) > 0.1


def test_without_the_tied_router_granular_experts_miss_chunks():
    torch.manual_seed(0)
    m = _cfg("model.upcycle=granular", "model.moe.expert_hidden=16", "model.moe.top_k=3")
    dense = DenseFFN(D, H, 0.3, 0.3)
    layer = _upcycled(m, dense)
    with torch.no_grad():
        layer.router.weight.normal_(std=1.0)  # untied: a token's top 3 need not hold the 3 chunks
    x = torch.randn(2, 7, D)
    with torch.no_grad():
        assert float((layer(x) - dense(x)).abs().max()) > 1e-3


def test_experts_do_not_depend_on_the_rank_that_makes_them():
    m = _cfg("model.upcycle=granular", "model.moe.expert_hidden=16", "model.moe.top_k=3", "model.upcycle_noise=0.1")
    w13, w2 = torch.randn(2 * H, D), torch.randn(D, H)
    whole = expert_weights(m, w13, w2, range(6), 1, 7)
    halves = [expert_weights(m, w13, w2, r, 1, 7) for r in (range(0, 3), range(3, 6))]
    for i in range(2):
        assert torch.equal(torch.cat([halves[0][i], halves[1][i]]), whole[i])
    exact = expert_weights(_cfg("model.upcycle=granular", "model.moe.expert_hidden=16", "model.moe.top_k=3"),
                           w13, w2, range(6), 1, 7)
    noise = (whole[0] - exact[0]).std() / w13.std()
    assert 0.05 < float(noise) < 0.2  # relative to the dense matrix's std
    assert torch.equal(exact[0][0], exact[0][3]) and torch.equal(exact[1][1], w2[:, 16:32] * 3)


@pytest.mark.parametrize("overrides, named", [
    (["model.upcycle=copy", "model.moe.expert_hidden=24"], "model.moe.expert_hidden=24: model.upcycle=copy"),
    (["model.upcycle=granular", "model.moe.expert_hidden=20"], "model.moe.expert_hidden=20"),
    (["model.upcycle=granular", "model.moe.expert_hidden=12"], "model.moe.num_experts=6, model.moe.top_k=2"),
    (["model.upcycle=copy", "model.moe.renormalize=false"], "model.moe.renormalize=false"),
    (["model.upcycle=copy", "model.moe.router=expert_choice"], "model.moe.router=expert_choice"),
    (["model.upcycle=copy", "model.moe.num_shared_experts=1"], "model.moe.num_shared_experts=1"),
    (["model.upcycle=granular", "model.moe.expert_hidden=24", "model.moe.n_groups=3", "model.moe.topk_groups=1"],
     "model.moe.n_groups=3"),
])
def test_what_cannot_keep_the_function_is_refused_by_name(overrides, named):
    with pytest.raises(ConfigError, match=named):
        granularity(_cfg(*overrides), H)


def test_upcycle_needs_a_source_and_an_moe_config():
    with pytest.raises(ConfigError, match="model.upcycle=copy makes experts from a dense model"):
        check_fields(load_config(None, ["model.upcycle=copy"]))
    with pytest.raises(ConfigError, match="model.upcycle must be"):
        check_fields(load_config(None, ["model.upcycle=split", "model.init_from=x", "model.moe.num_experts=4"]))
