"""moe/tools/hf_export.py: our models as transformers' Llama, Qwen3, Mixtral, OLMoE, Qwen3-MoE and Qwen2-MoE,
computing the same logits (to fp32 rounding), and every model no transformers architecture expresses
refused by name. `moe export` end to end on the committed format-1 checkpoint."""
import os
import shutil

import pytest
import torch

from moe.cli import main
from moe.config import ConfigError, load_config
from moe.nn.gpt import GPT
from moe.nn.hf import hf_architecture, to_hf_state_dict
from moe.tools.hf_export import hf_model
from tests.helpers import ROOT

transformers = pytest.importorskip("transformers")

TINY = ["model.vocab_size=97", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32",
        "model.ffn_hidden=64", "model.init_std=0.2", "model.moe.dispatch=reference"]
ARCHITECTURES = {
    "LlamaForCausalLM": ["model.n_kv_heads=1"],
    "Qwen3ForCausalLM": ["model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=12", "model.qk_norm=head"],
    "MixtralForCausalLM": ["model.moe.num_experts=4", "model.moe.renormalize=true", "model.n_kv_heads=1"],
    "OlmoeForCausalLM": ["model.moe.num_experts=4", "model.qk_norm=proj"],
    "Qwen3MoeForCausalLM": ["model.moe.num_experts=4", "model.moe.renormalize=true", "model.n_heads=4",
                            "model.n_kv_heads=2", "model.head_dim=12", "model.qk_norm=head",
                            "model.tie_embeddings=false"],
    # shared experts (gate zero, down projection doubled) and a dense block before the MoE block
    "Qwen2MoeForCausalLM": ["model.moe.num_experts=4", "model.moe.num_shared_experts=2", "model.moe.moe_every=2",
                            "model.moe.expert_hidden=16", "model.n_kv_heads=1"],
}


def _ours(*overrides):
    cfg = load_config(None, [*TINY, *overrides]).model
    torch.manual_seed(0)
    return GPT(cfg).eval()


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_the_exported_model_computes_our_logits(architecture):
    ours = _ours(*ARCHITECTURES[architecture])
    hf = hf_model(ours.cfg, ours.state_dict())
    assert type(hf).__name__ == architecture
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ours(x).logits, hf(x).logits
    assert float(want.abs().max()) > 1.0  # logits far from zero: the comparison means something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_without_the_rope_permutation_the_logits_differ():
    ours = _ours(*ARCHITECTURES["LlamaForCausalLM"])
    hf = hf_model(ours.cfg, ours.state_dict())
    sd = to_hf_state_dict(ours.cfg, ours.state_dict())
    q, k, _ = ours.state_dict()["blocks.0.attn.qkv.weight"].split([32, 16, 16])
    sd["model.layers.0.self_attn.q_proj.weight"], sd["model.layers.0.self_attn.k_proj.weight"] = q, k
    hf.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert float((hf(x).logits - ours(x).logits).abs().max()) > 1e-2


@pytest.mark.parametrize("overrides, named", [
    (["model.moe.router=hash"], "model.moe.router=hash"),
    (["model.moe.score_func=sigmoid"], "model.moe.score_func=sigmoid"),
    (["model.moe.n_groups=2", "model.moe.topk_groups=1"], "model.moe.n_groups=2"),
    (["model.moe.bias_update_rate=0.01"], "model.moe.bias_update_rate=0.01"),
    (["model.moe.routed_scaling_factor=2.5"], "model.moe.routed_scaling_factor=2.5"),
    (["model.moe.num_shared_experts=1", "model.qk_norm=head"], "model.qk_norm=head with model.moe.num_shared_experts=1"),
    (["model.moe.moe_every=2"], "model.moe.moe_layers: dense blocks [0]"),
    (["model.moe.eval_capacity_factor=1.5"], "model.moe.eval_capacity_factor=1.5"),
    ([], "model.moe.renormalize=false"),
])
def test_what_no_architecture_expresses_is_refused_by_name(overrides, named):
    cfg = load_config(None, [*TINY, "model.moe.num_experts=4", *overrides]).model
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        hf_architecture(cfg)


def test_a_dense_model_with_qk_norm_over_the_projection_is_refused():
    with pytest.raises(ConfigError, match="model.qk_norm=proj on a dense model"):
        hf_architecture(load_config(None, [*TINY, "model.qk_norm=proj"]).model)


def _v1_run(tmp_path, renormalize):
    run = tmp_path / "v1_moe"
    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "checkpoint_v1", "v1_moe"), run)
    if renormalize:  # the format-1 fixture (format 1 has no checksums); Mixtral needs renormalised gates
        step_cfg = run / "checkpoints" / "step_00000003" / "config.yaml"
        step_cfg.write_text(step_cfg.read_text().replace("renormalize: false", "renormalize: true"))
    return run


def test_moe_export_writes_a_folder_transformers_loads_with_our_logits(tmp_path, capsys):
    from moe.tools.inference import load_run

    run = _v1_run(tmp_path, renormalize=True)
    main(["export", str(run), "--hf", str(tmp_path / "hf")])
    assert "MixtralForCausalLM" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ours, _, _ = load_run(str(run))
    x = torch.randint(0, ours.cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits, rtol=1e-5, atol=1e-5)
    # the run's tokenizer (bytes) as one AutoTokenizer loads: the same ids for any text, EOS 256
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "héllo wörld\n  def f():\tpass ✓ \x00\x7f"
    assert tokenizer.encode(text, add_special_tokens=False) == list(text.encode())
    assert tokenizer.decode(list(text.encode())) == text
    assert tokenizer.eos_token_id == 256 == hf.config.eos_token_id == hf.generation_config.eos_token_id


def test_a_trained_bpe_tokenizer_is_exported_as_it_is(tmp_path):
    from moe.config import DataConfig
    from moe.data import build_tokenizer
    from moe.tools.hf_export import hf_tokenizer

    texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 50
    ours = build_tokenizer(DataConfig(tokenizer="bpe", bpe_vocab_size=300, cache_dir=str(tmp_path)), lambda: texts)
    tok, eos = hf_tokenizer(ours)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos)
    assert fast.encode(texts[0], add_special_tokens=False) == ours.encode(texts[0])
    assert fast.eos_token_id == ours.eos_id


def test_moe_export_refuses_before_writing(tmp_path, capsys):
    run = _v1_run(tmp_path, renormalize=False)
    with pytest.raises(SystemExit) as exc:
        main(["export", str(run), "--hf", str(tmp_path / "hf")])
    assert exc.value.code == 2 and "model.moe.renormalize=false" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep")
    with pytest.raises(SystemExit):
        main(["export", str(_v1_run(tmp_path / "b", renormalize=True)), "--hf", str(taken)])
    assert "not empty" in capsys.readouterr().err and (taken / "x").read_text() == "keep"
