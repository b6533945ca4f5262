"""experiments/presets/: the published architectures at their real size, checked offline.

Our parameter counts equal transformers' own models of the same shape, built on the meta device
(no memory, no weights, no network): Mixtral, OLMoE and Qwen3-MoE for the MoE presets, Llama and
Qwen3 for dense partners. The published sizes (given to one decimal in the papers and model cards)
are matched at that precision. Every preset and its matched dense partners validate at the world
size of one 8-GPU node.
"""
import functools
import glob
import os

import pytest
import torch

from moe.config import attention_heads, expert_hidden, load_config, moe_layer_ids
from moe.tools.match import param_counts
from moe.train.plan import GB, Layout, estimate, table_cell
from moe.validate import validate
from tests.helpers import ROOT

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.xdist_group("presets")  # one worker: each preset is built on meta once

PRESETS = os.path.join(ROOT, "experiments", "presets")
# (total, active) in billions, as published (papers' tables, model cards)
PUBLISHED = {
    "olmoe_1b_7b": (6.9, 1.3),
    "mixtral_8x7b": (46.7, 12.9),
    "qwen3_30b_a3b": (30.5, 3.3),
    "deepseekmoe_16b": (16.4, 2.8),
}


def _preset(name, *overrides):
    return load_config(os.path.join(PRESETS, f"{name}.yaml"), list(overrides))


@functools.lru_cache(maxsize=None)
def _counts(name):
    """param_counts of a preset (built on meta once per test session: seconds for the large ones)."""
    return param_counts(_preset(name).model)


def _hf_count(config) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _common(m):
    n_heads, n_kv, head_dim = attention_heads(m)
    return dict(vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
                num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
                max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
                tie_word_embeddings=m.tie_embeddings)


def hf_config(m):
    """transformers' config of the same shape as our ModelConfig `m` (the architectures it has)."""
    c, e = _common(m), m.moe
    if e.num_experts == 0:
        if m.qk_norm == "head":
            return transformers.Qwen3Config(intermediate_size=m.ffn_hidden, **c)
        if m.qk_norm == "proj":  # OLMo 2: QK-norm over the whole projections (its norms sit after, same count)
            return transformers.Olmo2Config(intermediate_size=m.ffn_hidden, **c)
        assert m.qk_norm == "none"
        return transformers.LlamaConfig(intermediate_size=m.ffn_hidden, **c)
    assert moe_layer_ids(m) == list(range(m.n_layers)) and e.num_shared_experts == 0
    routed = dict(num_experts_per_tok=e.top_k, norm_topk_prob=e.renormalize)
    if m.qk_norm == "proj":
        return transformers.OlmoeConfig(intermediate_size=expert_hidden(m), num_experts=e.num_experts, **routed, **c)
    if m.qk_norm == "head":
        return transformers.Qwen3MoeConfig(moe_intermediate_size=expert_hidden(m), num_experts=e.num_experts,
                                           decoder_sparse_step=1, mlp_only_layers=[], **routed, **c)
    return transformers.MixtralConfig(intermediate_size=expert_hidden(m), num_local_experts=e.num_experts,
                                      num_experts_per_tok=e.top_k, **c)


@pytest.mark.parametrize("name", ["olmoe_1b_7b", "mixtral_8x7b", "qwen3_30b_a3b", "moe_125m"])
def test_moe_presets_count_exactly_what_transformers_builds(name):
    m = _preset(name).model
    assert _counts(name)["params_total"] == _hf_count(hf_config(m))


@pytest.mark.parametrize("name", ["olmoe_1b_7b_dense_active", "qwen3_30b_a3b_dense_total", "moe_125m_dense_active"])
def test_dense_partners_count_exactly_what_transformers_builds(name):
    m = _preset(name).model
    assert _counts(name)["params_total"] == _hf_count(hf_config(m))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_sizes(name):
    counts = _counts(name)
    total, active = PUBLISHED[name]
    assert round(counts["params_total"] / 1e9, 1) == total
    assert abs(counts["params_total"] / 1e9 - total) / total < 0.01
    # active sizes are published to one decimal: 1.28B reads as 1.3B
    assert abs(counts["params_active"] / 1e9 - active) <= 0.06


def test_debug_sized_gqa_and_qk_norm_count_like_transformers():
    for overrides in (["model.n_kv_heads=1", "model.qk_norm=proj"], ["model.head_dim=48", "model.qk_norm=head",
                                                                       "model.n_kv_heads=1"]):
        m = load_config(os.path.join(ROOT, "experiments", "debug_moe.yaml"),
                        ["model.vocab_size=257", "model.tie_embeddings=false", "model.moe.renormalize=true",
                         *overrides]).model
        assert param_counts(m)["params_total"] == _hf_count(hf_config(m))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(PRESETS, "*.yaml"))), ids=os.path.basename)
def test_every_preset_validates_for_one_node(path):
    if os.path.basename(path) == "base.yaml":
        pytest.skip("the shared settings, not a model")
    cfg = load_config(path)
    validate(cfg, world_size=8)
    assert cfg.model.vocab_size > 0  # planned and counted without a tokenizer download


def test_the_readme_table_is_what_the_code_computes():
    from moe.nn.accounting import flops_per_token

    readme = open(os.path.join(ROOT, "README.md")).read()
    rows = [line for line in readme.splitlines() if line.startswith("| `") and "heads x" in line]
    assert len(rows) == 15
    for row in rows:
        name, _, total, active, flops, plan = [c.strip() for c in row.strip("|").split("|")]
        cfg = _preset(name.strip("`"))
        counts = _counts(name.strip("`"))
        assert total == f"{counts['params_total'] / 1e9:.3f}B" and active == f"{counts['params_active'] / 1e9:.3f}B", name
        assert flops == f"{flops_per_token(cfg.model, cfg.train.seq_len)['flops_per_token']:.3e}", name
        # `moe plan PRESET --nodes 1 --gpus-per-node 8 --gpu-memory 80GB`, in a few words
        assert plan == table_cell(estimate(cfg, Layout(nodes=1, gpus_per_node=8, memory=80 * GB), counts=counts,
                                           advise=False)), name
