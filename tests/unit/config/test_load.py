"""Every bad input fails with one clear line naming the key, before any model is built."""
import os

import pytest

from moe.config import ConfigError, load_config, validate

from tests.helpers import ROOT
MOE_YAML = os.path.join(ROOT, "experiments", "debug_moe.yaml")


def check(overrides, match, world_size=1, path=MOE_YAML):
    with pytest.raises(ConfigError, match=match):
        validate(load_config(path, overrides), world_size)


def test_layering_and_overrides():
    cfg = load_config(MOE_YAML, ["model.n_layers=3", "train.steps=7"])
    assert cfg.model.moe.num_experts == 4  # from debug_moe.yaml
    assert cfg.model.d_model == 64  # from debug_dense.yaml via defaults
    assert cfg.model.n_layers == 3 and cfg.train.steps == 7
    assert cfg.run.name == "debug_moe"
    validate(cfg)


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


@pytest.mark.parametrize("overrides,match", [
    (["model.nlayers=3"], r"nlayers"),
    (["model.n_layers=three"], r"model\.n_layers"),
    (["notakey"], r"key=value"),
])
def test_unknown_keys_and_types(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(MOE_YAML, overrides)


def test_unknown_yaml_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match="d_modle"):
        load_config(str(bad))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_batch_must_divide_world():
    check(["train.global_batch_size=12"], r"data-parallel size \(2\)", world_size=2)
