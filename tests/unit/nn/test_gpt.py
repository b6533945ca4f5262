import pytest
import torch

from moe.config import load_config
from moe.nn.moe_layer import DenseFFN, MoELayer
from moe.nn.gpt import GPT, KVCache, count_params, flops_per_token


def tiny(overrides=()):
    return load_config(None, ["model.vocab_size=97", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                              "model.max_seq_len=32", "model.ffn_hidden=64", *overrides])


def test_shapes_and_loss():
    torch.manual_seed(0)
    m = GPT(tiny(["model.moe.num_experts=4"]).model)
    x = torch.randint(0, 97, (3, 16))
    out = m(x, x)
    assert out.logits.shape == (3, 16, 97)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.aux_loss > 0  # aux and z losses of both MoE layers


@pytest.mark.parametrize("moe", [False, True])
def test_causality(moe):
    """Changing a future token never changes an earlier position's output."""
    torch.manual_seed(0)
    cfg = tiny(["model.moe.num_experts=4"] if moe else [])
    m = GPT(cfg.model).eval()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    a, b = m(x).logits, m(y).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_one_expert_moe_equals_dense_forward_and_grads():
    """A 1-expert top-1 MoE (softmax weight = 1) with copied weights is exactly the dense FFN."""
    torch.manual_seed(0)
    dense = DenseFFN(32, 64, 0.02, 0.02)
    cfg = tiny(["model.moe.num_experts=1", "model.moe.top_k=1", "model.moe.expert_hidden=64",
                "model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0"]).model.moe
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


def test_gradients_reach_router_and_every_used_expert():
    torch.manual_seed(0)
    m = GPT(tiny(["model.moe.num_experts=4"]).model)
    x = torch.randint(0, 97, (4, 16))
    out = m(x, x)
    (out.loss + out.aux_loss).backward()
    for layer in m.moe_layers():
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
        assert layer.experts.w13.grad.abs().sum() > 0


def test_router_gets_gradient_from_lm_loss_alone():
    torch.manual_seed(0)
    m = GPT(tiny(["model.moe.num_experts=4", "model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0"]).model)
    x = torch.randint(0, 97, (4, 16))
    m(x, x).loss.backward()
    assert all(l.router.weight.grad.abs().sum() > 0 for l in m.moe_layers())


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    m = GPT(tiny(["model.moe.num_experts=4"]).model).eval()
    x = torch.randint(0, 97, (1, 12))
    full = m(x).logits
    cfg = m.cfg
    cache = KVCache(cfg.n_layers, 1, cfg.n_heads, 32, cfg.d_model // cfg.n_heads, "cpu", torch.float32)
    first = m(x[:, :7], cache=cache, start_pos=0).logits
    steps = [m(x[:, i:i + 1], cache=cache, start_pos=i).logits for i in range(7, 12)]
    inc = torch.cat([first] + steps, dim=1)
    torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-5)


def test_param_and_flop_accounting_equal_active():
    """The quickstart pair: 8 experts of 256 top-2 vs dense 512 have equal active FFN size."""
    base = ["model.vocab_size=257", "model.d_model=128", "model.n_layers=4", "model.ffn_hidden=512"]
    dense_cfg = load_config(None, base).model
    moe_cfg = load_config(None, base + ["model.moe.num_experts=8", "model.moe.expert_hidden=256"]).model
    dense, moe = count_params(GPT(dense_cfg)), count_params(GPT(moe_cfg))
    assert dense["params_total"] == dense["params_active"]
    router = 4 * 8 * 128
    assert moe["params_active"] == dense["params_active"] + router
    expert = 3 * 128 * 256
    assert moe["params_total"] == moe["params_active"] + 4 * 6 * expert
    fd, fm = flops_per_token(dense_cfg, 256)["flops_per_token"], flops_per_token(moe_cfg, 256)["flops_per_token"]
    assert fm - fd == 3 * 2 * router  # only the router differs


def test_shared_experts_count_as_active():
    cfg = tiny(["model.moe.num_experts=4", "model.moe.top_k=1", "model.moe.num_shared_experts=2",
                "model.moe.expert_hidden=16"]).model
    p = count_params(GPT(cfg))
    per_expert = 3 * 32 * 16
    routed_inactive = 2 * 3 * per_expert  # 2 layers, 3 of 4 experts idle
    assert p["params_total"] - p["params_active"] == routed_inactive
