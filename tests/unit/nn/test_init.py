"""Meta-device construction and the layout-free init: a rank's expert slice starts from exactly the
EP=1 experts; every parameter and buffer gets a value; attributes and tied weights survive."""
import pytest
import torch
from torch import nn

from moe.nn.gpt import GPT, init_stds, rope_tables
from moe.nn.init import has_meta, init_weights, materialize
from tests.helpers import tiny_gpt_config

ALL = ("model.moe.num_experts=4", "model.moe.num_shared_experts=1", "model.moe.noisy_gating=true",
       "model.moe.bias_update_rate=0.01", "model.moe.global_aux_loss_coef=0.01", "model.qk_norm=head")


def built(*overrides, seed=7, slice_experts=None):
    """GPT on meta, experts optionally sliced to [start, stop) as expert parallelism does, materialised
    on the CPU and initialised."""
    with torch.device("meta"):
        model = GPT(tiny_gpt_config(*overrides).model)
    assert has_meta(model)
    if slice_experts is not None:
        start, stop = slice_experts
        for layer in model.moe_layers():
            for name in ("w13", "w2"):
                setattr(layer.experts, name, nn.Parameter(getattr(layer.experts, name)[start:stop].clone()))
            layer.experts.ep_offset = start
    materialize(model, torch.device("cpu"))
    init_weights(model, seed)
    assert not has_meta(model)
    return model


def test_expert_slices_are_the_ep1_experts_and_the_rest_is_equal():
    full = built(*ALL)
    for start in (0, 2):
        part = built(*ALL, slice_experts=(start, start + 2))
        for (name, p), (_, q) in zip(full.named_parameters(), part.named_parameters()):
            ref = p[start:start + 2] if name.endswith(("experts.w13", "experts.w2")) else p
            torch.testing.assert_close(q, ref, rtol=0, atol=0, msg=name)


def test_distributions_buffers_and_seed():
    model = built(*ALL, "model.init_std=0.05", "model.n_layers=2")
    init_std, out_std = init_stds(0.05, 2)
    sd = {n: p.detach() for n, p in model.named_parameters()}
    assert abs(float(sd["embed.weight"].std()) - init_std) < 0.1 * init_std
    assert abs(float(sd["blocks.1.ffn.experts.w2"].std()) - out_std) < 0.1 * out_std
    assert abs(float(sd["blocks.0.ffn.router.weight"].std()) - 0.02) < 0.1 * 0.02
    assert torch.all(sd["blocks.0.attn_norm.weight"] == 1) and torch.all(sd["blocks.0.ffn.router.noise_weight"] == 0)
    # every expert draws its own numbers
    w13 = sd["blocks.0.ffn.experts.w13"]
    assert not torch.equal(w13[0], w13[1])
    router = model.moe_layers()[0].router
    assert torch.all(router.expert_bias == 0) and torch.all(router.step_load == 0)
    torch.testing.assert_close(router.global_load, torch.full((4,), 0.25))
    cos, _ = rope_tables(16, 32, model.cfg.rope_theta)
    torch.testing.assert_close(model.rope_cos, cos)
    other = built(*ALL, "model.init_std=0.05", "model.n_layers=2", seed=8)
    assert not torch.equal(other.embed.weight, model.embed.weight)
    same = built(*ALL, "model.init_std=0.05", "model.n_layers=2")
    assert torch.equal(same.blocks[1].ffn.experts.w13, model.blocks[1].ffn.experts.w13)


def test_tied_head_stays_tied_and_attributes_survive():
    with torch.device("meta"):
        model = GPT(tiny_gpt_config("model.tie_embeddings=true").model)
    model.embed.weight.allreduce = False  # as DeepSpeed's expert marks
    materialize(model, torch.device("cpu"))
    init_weights(model, 0)
    assert model.head.weight is model.embed.weight and model.embed.weight.allreduce is False


def test_a_parameter_without_rule_is_an_error():
    with torch.device("meta"):
        model = GPT(tiny_gpt_config().model)
    model.blocks[0].extra = nn.Linear(2, 2, bias=False)
    materialize(model, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="blocks.0.extra.weight"):
        init_weights(model, 0)
