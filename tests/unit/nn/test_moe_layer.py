import pytest
import torch

from moe import ops
from moe.config import load_config
from moe.nn.ffn import DenseFFN
from moe.nn.moe_layer import MoELayer
from tests.helpers import tiny_gpt_config


def moe_cfg(*overrides):
    return load_config(None, ["model.vocab_size=10", "model.moe.num_experts=4", *overrides]).model.moe


def test_one_expert_moe_equals_dense_forward_and_grads():
    """A 1-expert top-1 MoE (softmax weight = 1) with copied weights is exactly the dense FFN."""
    torch.manual_seed(0)
    dense = DenseFFN(32, 64, 0.02, 0.02)
    cfg = tiny_gpt_config("model.moe.num_experts=1", "model.moe.top_k=1", "model.moe.expert_hidden=64",
                          "model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0").model.moe
    moe = MoELayer(32, 64, cfg, 0.02, 0.02)
    with torch.no_grad():
        moe.experts.w13[0].copy_(dense.w13.weight)
        moe.experts.w2[0].copy_(dense.w2.weight)
    x = torch.randn(4, 8, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    yd, ym = dense(x), moe(x2)
    torch.testing.assert_close(ym, yd, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(yd)
    yd.backward(g)
    ym.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(moe.experts.w13.grad[0], dense.w13.weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(moe.experts.w2.grad[0], dense.w2.weight.grad, rtol=1e-6, atol=1e-6)


def test_capacity_drops_and_dropped_tokens_contribute_zero():
    torch.manual_seed(0)
    cfg = moe_cfg("model.moe.top_k=1", "model.moe.capacity_factor=0.5", "model.moe.min_capacity=1")
    layer = MoELayer(16, 32, cfg, 0.02, 0.02)
    with torch.no_grad():  # send every token to expert 0
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0
    x = torch.rand(1, 8, 16) + 0.1
    y = layer(x)
    # capacity = ceil(0.5 * 8 * 1 / 4) = 1: one token kept, seven dropped (output zero -> residual only)
    nonzero = (y.abs().sum(-1) > 0).sum()
    assert int(nonzero) == 1
    assert layer.stats.dropped == 7


def test_eval_uses_eval_capacity_factor():
    cfg = moe_cfg("model.moe.capacity_factor=1.0", "model.moe.eval_capacity_factor=0")
    layer = MoELayer(16, 32, cfg, 0.02, 0.02)
    assert layer.capacity(100) == 50
    layer.eval()
    assert layer.capacity(100) is None


@pytest.mark.parametrize("impl", ["loop", "padded", "grouped"])
@pytest.mark.parametrize("overrides", [(), ("model.moe.capacity_factor=1.0", "model.moe.min_capacity=1"),
                                       ("model.moe.random_routing=true",)], ids=["dropless", "capacity", "slot_mask"])
def test_expert_impls_agree(impl, overrides):
    """Every expert backend gives the layer the same output and gradients (dropless, with tokens
    dropped, and with slots the router leaves unused)."""
    if impl == "grouped" and not hasattr(torch, "_grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no _grouped_mm")
    layers = []
    for name in ("loop", impl):
        torch.manual_seed(0)
        layers.append(MoELayer(16, 32, moe_cfg(f"model.moe.experts_impl={name}", *overrides), 0.02, 0.02))
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 10, 16)
    g = torch.randn(2, 10, 16)
    results = []
    for layer in layers:
        xx = x.clone().requires_grad_()
        torch.manual_seed(1)  # the same random routing draws
        out = layer(xx)
        out.backward(g)
        results.append([out, xx.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not ops.extension_available(), reason="moe._C is not built")
@pytest.mark.parametrize("overrides", [(), ("model.moe.capacity_factor=1.0", "model.moe.min_capacity=1"),
                                       ("model.moe.random_routing=true",)], ids=["dropless", "capacity", "slot_mask"])
def test_extension_layer_matches_reference(overrides):
    """The whole layer (compiled dispatch + compiled experts) against the pure-PyTorch reference:
    output, every gradient and the router statistics."""
    torch.manual_seed(0)
    ref = MoELayer(16, 32, moe_cfg("model.moe.dispatch=reference", *overrides), 0.02, 0.02)
    ext = MoELayer(16, 32, moe_cfg("model.moe.dispatch=extension", *overrides), 0.02, 0.02)
    ext.load_state_dict(ref.state_dict())
    assert ext.experts.backend == "extension" and ref.experts.backend == "reference"
    x = torch.randn(2, 40, 16, requires_grad=True)
    outs = []
    for layer in (ref, ext):
        torch.manual_seed(1)  # the same random-routing draw
        y = layer(x)
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + sum(layer.aux_losses.values())
        outs.append([y, *torch.autograd.grad(loss, [x, *layer.parameters()])])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name in ("tokens_per_expert", "dropped", "slots", "dropped_tokens", "entropy_sum", "lse2_sum"):
        torch.testing.assert_close(torch.as_tensor(getattr(ext.stats, name), dtype=torch.float64),
                                   torch.as_tensor(getattr(ref.stats, name), dtype=torch.float64))


@pytest.mark.parametrize("impl,dtype", [("loop", torch.float32), ("grouped", torch.bfloat16)], ids=["loop", "grouped"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_layer_compiles_in_one_graph(impl, dtype, training):
    """torch.compile(fullgraph=True) of the whole dropless layer (router, routing index, dispatch,
    experts, and in training the router statistics): no host sync or Python fallback breaks the
    graph, and output, gradients and statistics equal eager. `loop` runs the compiled grouped
    SwiGLU op (the extension); `grouped` torch._grouped_mm, whose fake kernel takes bf16 only."""
    if impl == "loop" and not ops.extension_available():
        pytest.skip("moe._C is not built: the reference loop reads the counts on the host")
    if impl == "grouped" and not hasattr(torch, "_grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no _grouped_mm")
    torch.manual_seed(0)
    layers = [MoELayer(32, 64, moe_cfg(f"model.moe.experts_impl={impl}"), 0.02, 0.02).to(dtype).train(training)
              for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    compiled = torch.compile(layers[1], fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 24, 32, dtype=dtype)
    g = torch.randn(2, 24, 32, dtype=dtype)
    results = []
    for layer, fn in ((layers[0], layers[0]), (layers[1], compiled)):
        xx = x.clone().requires_grad_()
        out = fn(xx)
        out.backward(g)
        results.append([out, xx.grad] + [p.grad for p in layer.parameters()])
    torch._dynamo.reset()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    if training:
        torch.testing.assert_close(layers[1].stats.tokens_per_expert, layers[0].stats.tokens_per_expert)


def test_routed_scaling_factor_scales_the_routed_experts_only():
    """DeepSeek-V3's routed scaling factor multiplies the routed experts' gate weights; the shared
    experts are added unscaled (as megatron-core's moe_router_topk_scaling_factor)."""
    def build(factor):
        cfg = load_config(None, ["model.vocab_size=10", "model.moe.num_experts=4", "model.moe.top_k=2",
                                 "model.moe.num_shared_experts=1", "model.moe.score_func=sigmoid",
                                 f"model.moe.routed_scaling_factor={factor}"]).model.moe
        torch.manual_seed(0)
        return MoELayer(16, 32, cfg, 0.02, 0.02).eval()

    plain, scaled = build(1.0), build(2.5)
    x = torch.randn(2, 8, 16)
    shared = plain.shared_experts(x.reshape(-1, 16)).view_as(x)
    torch.testing.assert_close(scaled(x) - shared, 2.5 * (plain(x) - shared))


@pytest.mark.skipif(not ops.extension_available(), reason="moe._C is not built")
@pytest.mark.parametrize("overrides,fused", [((), True), (("model.moe.capacity_factor=1.0", "model.moe.min_capacity=1"), True),
                                             (("model.moe.random_routing=true",), False)],
                         ids=["dropless", "capacity", "slot_mask"])
def test_extension_layer_fuses_permute_experts_and_combine(overrides, fused, monkeypatch):
    """With the extension on CPU permute, experts and unpermute are one op (no permute or unpermute op,
    no [N, d] rows), dropless or under a capacity; with unused slots (a virtual expert's rows) the layer
    runs the three ops. test_extension_layer_matches_reference checks the numbers of both paths against
    the reference."""
    layer = MoELayer(16, 32, moe_cfg("model.moe.dispatch=extension", *overrides), 0.02, 0.02).train()
    calls = []
    for name in ("permute", "unpermute"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    layer(torch.randn(2, 40, 16)).sum().backward()
    assert calls == ([] if fused else ["permute", "unpermute"])
