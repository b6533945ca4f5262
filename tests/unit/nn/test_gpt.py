import pytest
import torch

from moe.config import attention_heads
from moe.nn.gpt import GPT, KVCache, apply_rope, rope_tables
from tests.helpers import tiny_gpt_config


def test_shapes_and_loss():
    torch.manual_seed(0)
    m = GPT(tiny_gpt_config("model.moe.num_experts=4").model)
    x = torch.randint(0, 97, (3, 16))
    out = m(x, x)
    assert out.logits.shape == (3, 16, 97)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.aux_loss > 0  # aux and z losses of both MoE layers


@pytest.mark.parametrize("moe", [False, True])
def test_causality(moe):
    """Changing a future token never changes an earlier position's output."""
    torch.manual_seed(0)
    cfg = tiny_gpt_config(*(["model.moe.num_experts=4"] if moe else []))
    m = GPT(cfg.model).eval()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    a, b = m(x).logits, m(y).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_gradients_reach_router_and_every_used_expert():
    torch.manual_seed(0)
    m = GPT(tiny_gpt_config("model.moe.num_experts=4").model)
    x = torch.randint(0, 97, (4, 16))
    out = m(x, x)
    (out.loss + out.aux_loss).backward()
    for layer in m.moe_layers():
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
        assert layer.experts.w13.grad.abs().sum() > 0


def test_router_gets_gradient_from_lm_loss_alone():
    torch.manual_seed(0)
    m = GPT(tiny_gpt_config("model.moe.num_experts=4", "model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0").model)
    x = torch.randint(0, 97, (4, 16))
    m(x, x).loss.backward()
    assert all(l.router.weight.grad.abs().sum() > 0 for l in m.moe_layers())


ATTENTION = {
    "mha": [],
    "gqa_qk_norm_head": ["model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=12", "model.qk_norm=head"],
    "mqa_qk_norm_proj": ["model.n_heads=4", "model.n_kv_heads=1", "model.qk_norm=proj"],
}


@pytest.mark.parametrize("attention", sorted(ATTENTION))
def test_kv_cache_matches_full_forward(attention):
    """Incremental decoding with the cache equals the full forward, for multi-head, grouped-query
    (with per-head QK-norm and a head width independent of d_model) and multi-query attention."""
    torch.manual_seed(0)
    m = GPT(tiny_gpt_config("model.moe.num_experts=4", *ATTENTION[attention]).model).eval()
    x = torch.randint(0, 97, (1, 12))
    full = m(x).logits
    cfg = m.cfg
    _, n_kv_heads, head_dim = attention_heads(cfg)
    cache = KVCache(cfg.n_layers, 1, n_kv_heads, 32, head_dim, "cpu", torch.float32)
    first = m(x[:, :7], cache=cache, start_pos=0).logits
    steps = [m(x[:, i:i + 1], cache=cache, start_pos=i).logits for i in range(7, 12)]
    inc = torch.cat([first] + steps, dim=1)
    torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-5)


def test_state_dict_keys_are_stable():
    """Checkpoints are keyed by parameter names: a refactor must not rename any (the RoPE tables are
    non-persistent buffers, not stored)."""
    cfg = tiny_gpt_config("model.moe.num_experts=4", "model.moe.num_shared_experts=1", "model.moe.moe_layers=[1]")
    block = ["attn_norm.weight", "attn.qkv.weight", "attn.proj.weight", "ffn_norm.weight"]
    want = ["embed.weight"]
    want += [f"blocks.0.{k}" for k in block] + ["blocks.0.ffn.w13.weight", "blocks.0.ffn.w2.weight"]
    want += [f"blocks.1.{k}" for k in block] + [
        "blocks.1.ffn.router.weight", "blocks.1.ffn.experts.w13", "blocks.1.ffn.experts.w2",
        "blocks.1.ffn.shared_experts.w13.weight", "blocks.1.ffn.shared_experts.w2.weight"]
    want += ["norm.weight", "head.weight"]
    assert list(GPT(cfg.model).state_dict()) == want


def test_grouped_query_attention_equals_its_heads_expanded():
    """GQA is multi-head attention whose key/value heads are shared: repeating each key/value head for
    its group of query heads (as transformers' repeat_kv does) gives the same output."""
    torch.manual_seed(0)
    cfg = tiny_gpt_config("model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=8").model
    attn = GPT(cfg).blocks[0].attn
    x = torch.randn(2, 10, cfg.d_model)
    cos, sin = rope_tables(8, 10, cfg.rope_theta)
    q, k, v = attn._project(x)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k[:, [0, 0, 1, 1]], v[:, [0, 0, 1, 1]]  # heads 0,1 read kv head 0; heads 2,3 kv head 1
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = attn.proj(want.transpose(1, 2).reshape(2, 10, 32))
    torch.testing.assert_close(attn(x, cos, sin, 0, None, 0), want)


@pytest.mark.parametrize("qk_norm, q_shape", [("head", (8,)), ("proj", (32,))])
def test_qk_norm_weights_are_per_head_or_over_the_projection(qk_norm, q_shape):
    cfg = tiny_gpt_config("model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=8", f"model.qk_norm={qk_norm}").model
    attn = GPT(cfg).blocks[0].attn
    assert tuple(attn.q_norm.weight.shape) == q_shape
    assert tuple(attn.k_norm.weight.shape) == ((8,) if qk_norm == "head" else (16,))
    assert tuple(attn.qkv.weight.shape) == (32 + 2 * 16, cfg.d_model) and tuple(attn.proj.weight.shape) == (cfg.d_model, 32)
