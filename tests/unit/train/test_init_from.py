"""moe/train/init_from.py: model.init_from reads a transformers folder of each architecture we export
(as save_pretrained writes it) into our model with transformers' own logits; export -> import gives our
logits back; a run of ours is read at any layout; a dense source upcycles into an MoE with the dense
logits; a source that does not fit is refused naming the key or tensors, and a resuming run ignores it."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe.config import ConfigError, load_config
from moe.nn.gpt import GPT
from moe.nn.hf import hf_architecture
from moe.train.init_from import init_module, open_init_source
from tests.helpers import ROOT

transformers = pytest.importorskip("transformers")

TINY = ["model.vocab_size=97", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32",
        "model.ffn_hidden=64", "model.moe.dispatch=reference"]
ARCHITECTURES = {
    "LlamaForCausalLM": ["model.n_kv_heads=1", "model.rope_theta=500000"],
    "Qwen3ForCausalLM": ["model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=12", "model.qk_norm=head",
                         "model.norm_eps=1e-6", "model.tie_embeddings=false"],
    "MixtralForCausalLM": ["model.moe.num_experts=4", "model.moe.renormalize=true", "model.n_kv_heads=1"],
    "OlmoeForCausalLM": ["model.moe.num_experts=4", "model.qk_norm=proj"],
    "Qwen3MoeForCausalLM": ["model.moe.num_experts=4", "model.moe.renormalize=true", "model.n_heads=4",
                            "model.n_kv_heads=2", "model.head_dim=12", "model.qk_norm=head", "model.moe.top_k=3",
                            "model.tie_embeddings=false", "model.moe.expert_hidden=16"],
    "Qwen2MoeForCausalLM": ["model.moe.num_experts=4", "model.moe.num_shared_experts=2", "model.moe.moe_every=2",
                            "model.moe.expert_hidden=16", "model.n_kv_heads=1"],
}
X = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))


def _cfg(tmp_path, *overrides):
    return load_config(None, [*TINY, f"run.root={tmp_path}/runs", *overrides])


def _random_hf_folder(cfg, folder):
    """A transformers model of cfg's architecture with random weights (norms too; Qwen2-MoE's shared
    expert gates zero, what our shared experts compute), saved as save_pretrained writes it."""
    name, kwargs = hf_architecture(cfg.model)
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**kwargs)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.dim() == 1 else 0.2 * torch.randn_like(p))
        for name, p in hf.named_parameters():
            if "shared_expert_gate" in name:
                p.zero_()
    hf.save_pretrained(str(folder))
    return hf


def _imported(cfg):
    source = open_init_source(cfg)
    torch.manual_seed(99)  # another init than the source's, overwritten
    ours = GPT(cfg.model).eval()
    init_module(ours, source, cfg)
    return ours


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_a_transformers_folder_gives_transformers_logits(tmp_path, architecture):
    folder = tmp_path / "hf"
    cfg = _cfg(tmp_path, *ARCHITECTURES[architecture], f"model.init_from={folder}")
    hf = _random_hf_folder(cfg, folder)
    assert type(hf).__name__ == architecture
    with torch.no_grad():
        want, got = hf(X).logits, _imported(cfg)(X).logits
    assert float(want.abs().max()) > 1.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_export_then_import_gives_our_logits_back(tmp_path):
    from moe.tools.hf_export import hf_model

    cfg = _cfg(tmp_path, *ARCHITECTURES["OlmoeForCausalLM"], f"model.init_from={tmp_path / 'hf'}")
    torch.manual_seed(0)
    ours = GPT(cfg.model).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf_model(cfg.model, ours.state_dict()).save_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        torch.testing.assert_close(_imported(cfg)(X).logits, ours(X).logits, rtol=1e-5, atol=1e-5)


def test_a_run_of_ours_is_read_from_its_step_folder(tmp_path):
    from moe.tools.inference import load_run

    run = os.path.join(ROOT, "tests", "fixtures", "checkpoint_v1", "v1_moe")
    want, _, run_cfg = load_run(run)
    cfg = load_config(None, [f"run.root={tmp_path}"])
    cfg.model = run_cfg.model
    cfg.model.init_from = run
    x = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_imported(cfg)(x).logits, want(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("upcycle", [["model.upcycle=copy", "model.moe.top_k=2"],
                                     ["model.upcycle=granular", "model.moe.expert_hidden=16", "model.moe.top_k=4",
                                      "model.moe.num_experts=8"]])
def test_a_dense_source_upcycles_with_the_dense_logits(tmp_path, upcycle):
    folder = tmp_path / "hf"
    dense = _cfg(tmp_path, *ARCHITECTURES["LlamaForCausalLM"])
    hf = _random_hf_folder(dense, folder)
    cfg = _cfg(tmp_path, *ARCHITECTURES["LlamaForCausalLM"], f"model.init_from={folder}", "model.moe.num_experts=4",
               "model.moe.renormalize=true", *upcycle)
    with torch.no_grad():
        torch.testing.assert_close(_imported(cfg)(X).logits, hf(X).logits, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def mixtral_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixtral")
    _random_hf_folder(_cfg(folder, *ARCHITECTURES["MixtralForCausalLM"]), folder / "hf")
    return folder / "hf"


@pytest.mark.parametrize("overrides, named", [
    (["model.n_kv_heads=2"], "model.n_kv_heads is 1 there and 2 here"),
    (["model.moe.renormalize=false"], "model.moe.renormalize is True there and False here"),
    (["model.vocab_size=98"], "model.vocab_size is 97 there and 98 here"),
    (["model.moe.num_experts=0"], "model.moe.num_experts is 4 there and 0 here"),
    (["model.upcycle=copy"], "model.upcycle=copy: model.init_from=.* is not a dense model"),
])
def test_a_source_that_does_not_fit_is_refused_naming_the_key(tmp_path, mixtral_folder, overrides, named):
    cfg = _cfg(tmp_path, *ARCHITECTURES["MixtralForCausalLM"], f"model.init_from={mixtral_folder}", *overrides)
    with pytest.raises(ConfigError, match=named):
        open_init_source(cfg)


def test_unknown_architectures_missing_tensors_and_unfit_dense_sources_are_named(tmp_path, mixtral_folder):
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((mixtral_folder / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    cfg = _cfg(tmp_path, *ARCHITECTURES["MixtralForCausalLM"], f"model.init_from={bad}")
    with pytest.raises(ConfigError, match="model_type 'gpt2'.*GPT2LMHeadModel"):
        open_init_source(cfg)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        open_init_source(cfg)
    tensors = load_file(str(mixtral_folder / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"], tensors["model.norm.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ConfigError, match="2 tensors of MixtralForCausalLM missing: model.norm.weight, "
                                          "model.layers.1.block_sparse_moe.experts.2.w3.weight"):
        open_init_source(cfg)
    with pytest.raises(ConfigError, match="neither a transformers folder"):
        open_init_source(_cfg(tmp_path, f"model.init_from={tmp_path}"))
    dense = tmp_path / "dense"
    _random_hf_folder(_cfg(tmp_path), dense)
    with pytest.raises(ConfigError, match="is a dense model and this config is an MoE: set model.upcycle"):
        open_init_source(_cfg(tmp_path, f"model.init_from={dense}", "model.moe.num_experts=4"))
    with pytest.raises(ConfigError, match="model.moe.expert_hidden=32: model.upcycle=copy"):
        open_init_source(_cfg(tmp_path, f"model.init_from={dense}", "model.moe.num_experts=4", "model.upcycle=copy",
                              "model.moe.renormalize=true", "model.moe.expert_hidden=32"))


def test_a_gated_shared_expert_is_refused(tmp_path):
    folder = tmp_path / "hf"
    cfg = _cfg(tmp_path, *ARCHITECTURES["Qwen2MoeForCausalLM"], f"model.init_from={folder}")
    _random_hf_folder(cfg, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.1.mlp.shared_expert_gate.weight"][0, 3] = 0.5
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="model.layers.1.mlp.shared_expert_gate.weight is not zero"):
        open_init_source(cfg)


def test_a_run_that_resumes_ignores_init_from(tmp_path):
    cfg = _cfg(tmp_path, "model.init_from=/nonexistent", "run.name=r")
    with pytest.raises(ConfigError, match="no such folder"):
        open_init_source(cfg)
    os.makedirs(tmp_path / "runs" / "r" / "checkpoints" / "step_00000002")
    assert open_init_source(cfg) is None


ENGINE_BODY = """
from moe.train.checkpoint.optimizer_state import OptimizerState
cfg = config("model.moe.renormalize=true", "train.zero_stage=2", "train.dtype=fp32",
             f"model.init_from={os.path.join(OUT, 'hf')}")
s = build_training(cfg, 1)
x = torch.load(os.path.join(OUT, "x.pt"))
with torch.no_grad():
    save_tensors("logits", {"logits": s.model.eval()(x).logits})
opt = OptimizerState(s.engine)
dump("masters", {n: float((opt.get_master(p) - p.detach().float().cpu()).abs().max())
                 for n, p in s.model.named_parameters()})
"""


@pytest.mark.slow  # one engine in a child process: 10 s
@pytest.mark.xdist_group("engine_build")
def test_through_the_engine_with_zero_2_weights_and_fp32_masters_come_from_the_folder(tmp_path, text_corpus,
                                                                                      data_cache):
    """build_training with model.init_from: the engine's model has transformers' logits and ZeRO-2's
    fp32 master partitions hold the same weights (else the first step would restore the random init)."""
    from tests.helpers import run_engine_script

    cfg = load_config(os.path.join(ROOT, "experiments", "debug_moe.yaml"),
                      ["model.d_model=32", "model.ffn_hidden=64", "model.moe.expert_hidden=32", "model.vocab_size=257",
                       "model.moe.renormalize=true"])
    hf = _random_hf_folder(cfg, tmp_path / "hf")
    x = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    out = run_engine_script(tmp_path, ENGINE_BODY, text_corpus, data_cache)
    with torch.no_grad():
        torch.testing.assert_close(load_file(os.path.join(out, "logits.safetensors"))["logits"], hf(x).logits,
                                   rtol=1e-5, atol=1e-5)
    masters = json.loads(open(os.path.join(out, "masters.json")).read())
    assert len(masters) > 10 and max(masters.values()) == 0.0, masters
