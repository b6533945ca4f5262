"""moe/nn/hf.py: the RoPE permutation both ways, our names read back from transformers' names (fused
and per expert, as save_pretrained writes them), and the ModelConfig a transformers config.json
describes, with what our model does not compute refused by name."""
import pytest
import torch

from moe.config import ConfigError, load_config
from moe.nn.gpt import GPT
from moe.nn.hf import (build_tensor, halves_from_pairs, hf_recipes, model_config_from_hf, pairs_from_halves,
                       recipe_names, to_hf_state_dict)

TINY = ["model.vocab_size=97", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=32",
        "model.ffn_hidden=64", "model.n_kv_heads=2", "model.head_dim=12", "model.qk_norm=head"]
LLAMA = {"model_type": "llama", "vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 64, "tie_word_embeddings": True, "hidden_act": "silu",
         "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}, "rms_norm_eps": 1e-6}


def test_halves_from_pairs_reorders_each_head_and_pairs_from_halves_undoes_it():
    rows = torch.arange(8.0)[:, None]  # two heads of width 4: pairs (0,1) (2,3) | (4,5) (6,7)
    assert halves_from_pairs(rows, 4)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    w = torch.randn(3 * 12, 5)
    assert torch.equal(pairs_from_halves(halves_from_pairs(w, 12), 12), w)
    assert not torch.equal(pairs_from_halves(w, 12), w)


@pytest.mark.parametrize("overrides", [[], ["model.moe.num_experts=4", "model.moe.renormalize=true",
                                            "model.tie_embeddings=false"]])
def test_our_state_dict_comes_back_from_transformers_fused_names(overrides):
    cfg = load_config(None, [*TINY, *overrides]).model
    torch.manual_seed(0)
    sd = GPT(cfg).state_dict()
    theirs = to_hf_state_dict(cfg, sd)
    recipes = hf_recipes(cfg, "Qwen3MoeForCausalLM" if cfg.moe.num_experts else "Qwen3ForCausalLM", theirs)
    assert all(n in theirs for r in recipes.values() for n in recipe_names(r, cfg.moe.num_experts))
    for name, recipe in recipes.items():
        assert torch.equal(build_tensor(recipe, theirs.__getitem__, 12), sd[name]), name
    # an expert-parallel rank reads its slice of a fused [E, ...] tensor
    if cfg.moe.num_experts:
        got = build_tensor(recipes["blocks.1.ffn.experts.w2"], theirs.__getitem__, 12, range(2, 4))
        assert torch.equal(got, sd["blocks.1.ffn.experts.w2"][2:4])


def test_per_expert_names_as_save_pretrained_writes_them():
    cfg = load_config(None, [*TINY, "model.moe.num_experts=4", "model.qk_norm=none", "model.head_dim=0",
                             "model.n_heads=2", "model.n_kv_heads=1"]).model
    E, h, d = 4, 64, 32
    files = {}
    for e in range(E):
        for i, name in enumerate(("w1", "w3", "w2")):
            shape = (d, h) if name == "w2" else (h, d)
            files[f"model.layers.0.block_sparse_moe.experts.{e}.{name}.weight"] = torch.full(shape, 10.0 * e + i)
    recipes = hf_recipes(cfg, "MixtralForCausalLM", files)
    w13 = build_tensor(recipes["blocks.0.ffn.experts.w13"], files.__getitem__, 16, range(1, 3))
    assert w13.shape == (2, 2 * h, d) and w13[0, 0, 0] == 10 and w13[0, h, 0] == 11 and w13[1, 0, 0] == 20
    w2 = build_tensor(recipes["blocks.0.ffn.experts.w2"], files.__getitem__, 16, range(3, 4))
    assert w2.shape == (1, d, h) and float(w2[0, 0, 0]) == 32
    assert recipes["blocks.0.ffn.router.weight"][0] == [("model.layers.0.block_sparse_moe.gate.weight", "")]


def test_a_config_json_becomes_our_model_config():
    arch, m = model_config_from_hf(LLAMA)
    assert arch == "LlamaForCausalLM"
    assert (m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_hidden, m.rope_theta, m.norm_eps, m.tie_embeddings,
            m.qk_norm, m.moe.num_experts) == (32, 4, 2, 8, 64, 5e5, 1e-6, True, "none", 0)
    old_style = {k: v for k, v in LLAMA.items() if k != "rope_parameters"}
    assert model_config_from_hf({**old_style, "rope_theta": 1234.0})[1].rope_theta == 1234.0
    arch, m = model_config_from_hf({**LLAMA, "model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2,
                                    "sliding_window": None})
    assert arch == "MixtralForCausalLM" and (m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden,
                                             m.moe.renormalize) == (8, 2, 64, True)
    arch, m = model_config_from_hf({**LLAMA, "model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2,
                                    "moe_intermediate_size": 16, "head_dim": 12, "norm_topk_prob": False})
    assert (m.qk_norm, m.head_dim, m.moe.expert_hidden, m.moe.renormalize) == ("head", 12, 16, False)


@pytest.mark.parametrize("change, named", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type 'gpt2'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act=gelu"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn"}}, "rope_type=yarn"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling="),
    ({"model_type": "qwen3_moe", "mlp_only_layers": [0], "num_experts": 4, "num_experts_per_tok": 2,
      "moe_intermediate_size": 16}, "mlp_only_layers"),
])
def test_what_our_model_does_not_compute_is_refused_by_name(change, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace("[", r"\[")):
        model_config_from_hf({**LLAMA, **change}, "x/config.json")
