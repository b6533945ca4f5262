"""moe/validate.py: the one validation every caller runs. The config's own checks and each
component's checks of its own knobs (routing, the expert backends, data) run in one fixed order, so a
config with several faults reports the same first one; every error is one ConfigError line naming the
key, raised before any model is built."""
import os
import subprocess
import sys

import pytest
import torch

from moe.config import ConfigError, ModelConfig, MoEConfig, load_config
from moe.errors import MoeError
from moe.nn import experts
from moe.ops.extension import ENVIRONMENT_SWITCHES
from moe.validate import validate

from tests.helpers import ROOT
MOE_YAML = os.path.join(ROOT, "experiments", "debug_moe.yaml")
DENSE_YAML = os.path.join(ROOT, "experiments", "debug_dense.yaml")


def check(overrides, match, world_size=1, path=MOE_YAML):
    with pytest.raises(ConfigError, match=match):
        validate(load_config(path, overrides), world_size)


def test_every_experiment_config_validates():
    exp = os.path.join(ROOT, "experiments")
    for name in sorted(os.listdir(exp)):
        if name.endswith(".yaml"):
            validate(load_config(os.path.join(exp, name)))


@pytest.mark.parametrize("overrides,match", [
    (["model.moe.top_k=5"], r"model\.moe\.top_k"),
    (["model.moe.capacity_factor=-1"], r"model\.moe\.capacity_factor"),
    (["model.moe.router=nope"], r"model\.moe\.router.*unknown router 'nope'.*topk"),
    (["train.seq_len=128"], r"train\.seq_len \(128\) exceeds model\.max_seq_len"),
    (["train.global_batch_size=6"], r"train\.global_batch_size"),
    (["data.dataset=/no/such/file.txt"], r"data\.dataset.*/no/such/file\.txt"),
    (["model.n_heads=3"], r"model\.n_heads"),
    (["train.zero_stage=3"], r"train\.zero_stage"),
    (["parallel.ep_size=3"], r"parallel\.ep_size"),
    (["model.moe.drop_policy=random"], r"model\.moe\.drop_policy"),
    (["model.moe.experts_impl=magic"], r"model\.moe\.experts_impl"),
    (["data.dataset=embedded:nope"], r"data\.dataset.*embedded:nope"),
])
def test_bad_values(overrides, match):
    check(overrides, match)


# ------------------------------------------------------------------------ the order of the checks


@pytest.mark.parametrize("overrides,first", [
    # ranges before everything: a NaN never reaches a cross-field check
    (["train.lr=nan", "model.n_heads=3", "model.moe.router=nope"], r"^train\.lr must be"),
    # the model's shape before the MoE knobs
    (["model.n_heads=3", "model.moe.router=nope"], r"^model\.d_model \(64\) must be divisible"),
    # the router's name (routing) before the MoE knobs that are plain config
    (["model.moe.router=nope", "model.moe.top_k=5", "model.moe.score_func=x"], r"unknown router 'nope'"),
    # plain MoE knobs (config) before the expert backend (nn.experts)
    (["model.moe.dispatch=x", "model.moe.experts_impl=magic"], r"^model\.moe\.dispatch must be"),
    # the expert backend before the router family's own checks (routing)
    (["model.moe.experts_impl=magic", "model.moe.router=switch"], r"^model\.moe\.experts_impl: unknown 'magic'"),
    # the router family before expert-parallel divisibility
    (["model.moe.router=switch", "parallel.ep_size=3"], r"^model\.moe\.router=switch sends each token"),
    # all MoE checks before the parallel layout, training, logging and the run name (config)
    (["parallel.ep_size=3", "train.dtype=x"], r"^parallel\.ep_size \(3\) must divide model\.moe\.num_experts"),
    (["model.moe.router=switch", "parallel.backend=x", "train.dtype=x", "run.name=.."], r"router=switch"),
    (["parallel.backend=x", "train.dtype=x"], r"^parallel\.backend must be"),
    (["train.dtype=x", "logging.wandb.mode=x"], r"^train\.dtype must be"),
    (["logging.wandb.mode=x", "run.name=.."], r"^logging\.wandb\.mode must be"),
    # the data section (data) last
    (["run.name=..", "data.dataset=embedded:nope"], r"^run\.name must be a plain folder name"),
    (["data.tokenizer=bpe", "data.bpe_vocab_size=100"], r"^data\.bpe_vocab_size must be >= 260"),
])
def test_a_config_with_several_faults_reports_the_first_in_a_fixed_order(overrides, first):
    check(overrides, first)


def test_a_dense_model_ignores_the_moe_knobs():
    validate(load_config(DENSE_YAML, ["model.moe.router=nope", "model.moe.experts_impl=magic", "model.moe.top_k=99",
                                      "model.moe.dispatch=x"]))
    check(["parallel.ep_size=2"], r"parallel\.ep_size=2 needs MoE layers", world_size=2, path=DENSE_YAML)


def test_moe_config_imports_no_component():
    """moe.config is the bottom layer: loading it pulls in no router, model or data code (moe.validate
    brings them)."""
    code = ("import sys, moe.config; bad = [m for m in sys.modules if m.split('.')[:2] in "
            "(['moe', 'routing'], ['moe', 'nn'], ['moe', 'data'], ['moe', 'validate'])]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


# ---------------------------------------------------------------- moe.nn.experts.check_config


def _model(**moe_kw):
    return ModelConfig(d_model=64, moe=MoEConfig(**{"num_experts": 4, **moe_kw}))


@pytest.mark.parametrize("impl", ["auto", "loop", "padded"])
def test_experts_check_config_accepts_known_backends(impl):
    experts.check_config(_model(experts_impl=impl, expert_hidden=100))  # any shape: no alignment needed


def test_experts_check_config_refuses_unknown_backends_by_key():
    with pytest.raises(ConfigError, match=r"^model\.moe\.experts_impl: unknown 'magic'; known: auto, grouped, "
                                          r"loop, padded$"):
        experts.check_config(_model(experts_impl="magic"))
    experts.check_config(ModelConfig(moe=MoEConfig(num_experts=0, experts_impl="magic")))  # dense: not used


@pytest.mark.parametrize("name", ["MOE_CPU_GEMM", "MOE_CPU_ISA", "MOE_DISPATCH"])
def test_an_unknown_ops_switch_in_the_environment_is_refused_by_name(monkeypatch, name):
    """The C++ side reads MOE_CPU_GEMM / MOE_CPU_ISA once and would take a typo for the default: validate
    names the variable and its value for a model with experts; a dense model runs no expert op."""
    monkeypatch.setenv(name, "mkl")
    with pytest.raises(MoeError, match=rf"^{name}=mkl: unknown value; known: .* \(or unset\)$"):
        validate(load_config(MOE_YAML))
    validate(load_config(DENSE_YAML))
    for value in ENVIRONMENT_SWITCHES[name]:
        monkeypatch.setenv(name, value)
        validate(load_config(MOE_YAML))


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
def test_experts_check_config_needs_16_byte_rows_for_grouped():
    experts.check_config(_model(experts_impl="grouped", expert_hidden=96))
    with pytest.raises(ConfigError, match=r"^model\.moe\.experts_impl=grouped: .*expert_hidden=100 in "
                                          r"torch\.bfloat16 is 200 bytes"):
        experts.check_config(_model(experts_impl="grouped", expert_hidden=100))
    with pytest.raises(ConfigError, match=r"experts_impl=grouped: .*d_model=12"):
        experts.check_config(ModelConfig(d_model=12, moe=MoEConfig(num_experts=4, experts_impl="grouped")))
