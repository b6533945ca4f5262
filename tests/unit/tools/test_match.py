import os

import pytest

from moe.config import load_config
from moe.tools.match import match_dense, param_counts
from moe.nn.accounting import count_params
from moe.nn.gpt import GPT

from tests.helpers import ROOT


@pytest.mark.parametrize("overrides", [
    [],
    ["model.moe.num_shared_experts=1", "model.moe.expert_hidden=64", "model.moe.num_experts=16", "model.moe.top_k=4"],
    ["model.moe.moe_every=2", "model.tie_embeddings=false"],
])
def test_param_counts_equal_the_built_model(overrides):
    cfg = load_config(os.path.join(ROOT, "experiments/quickstart_moe.yaml"), ["model.vocab_size=257", *overrides])
    built = count_params(GPT(cfg.model))
    counted = param_counts(cfg.model)
    assert counted["params_total"] == built["params_total"]
    assert counted["params_active"] == built["params_active"]


@pytest.mark.parametrize("on", ["active", "total"])
@pytest.mark.parametrize("config", ["quickstart_moe.yaml", "debug_moe.yaml"])
def test_matched_dense_within_two_percent(config, on):
    cfg = load_config(os.path.join(ROOT, "experiments", config))
    dense, info = match_dense(cfg, on)
    assert dense.model.moe.num_experts == 0
    dense.model.vocab_size = 257
    cfg.model.vocab_size = 257
    got = count_params(GPT(dense.model))["params_total"]
    target = count_params(GPT(cfg.model))[f"params_{on}"]
    assert abs(got - target) / target < 0.02
    assert abs(info["rel_diff"]) < 0.02


def test_match_rejects_dense_config():
    cfg = load_config(os.path.join(ROOT, "experiments/debug_dense.yaml"))
    with pytest.raises(ValueError, match="already dense"):
        match_dense(cfg)


def test_committed_pairs_have_not_drifted():
    """Every generated dense partner in experiments/ladder/ still matches its MoE config."""
    import glob

    pairs = sorted(glob.glob(os.path.join(ROOT, "experiments", "ladder", "*_dense_*.yaml")))
    assert len(pairs) >= 6
    for path in pairs:
        moe_path, on = path.rsplit("_dense_", 1)
        on = on[:-len(".yaml")]
        dense_now, _ = match_dense(load_config(moe_path + ".yaml"), on)
        committed = load_config(path)
        assert committed.model.ffn_hidden == dense_now.model.ffn_hidden, f"{path}: re-run moe match"
        assert committed.model.moe.num_experts == 0


def test_quickstart_dense_is_the_active_match_of_quickstart_moe():
    dense, _ = match_dense(load_config(os.path.join(ROOT, "experiments/quickstart_moe.yaml")), "active")
    assert load_config(os.path.join(ROOT, "experiments/quickstart_dense.yaml")).model.ffn_hidden == dense.model.ffn_hidden


def test_match_cli_writes_a_layered_file(tmp_path):
    from moe.cli import main

    out = tmp_path / "d.yaml"
    main(["match", os.path.join(ROOT, "experiments/ladder/moe_16x1.yaml"), "--on", "total", "--out", str(out)])
    cfg = load_config(str(out))
    assert cfg.model.moe.num_experts == 0 and cfg.model.ffn_hidden == 8200 and cfg.model.d_model == 128
