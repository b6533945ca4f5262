"""Nonsensical router settings fail in validate() with a message naming the keys; moe.routing's
check_config checks them on its own."""
import glob
import os

import pytest

from moe.config import ConfigError, ModelConfig, MoEConfig, ParallelConfig, load_config
from moe.routing import ROUTERS, TopKRouter, check_config, check_router_name
from moe.validate import validate

from tests.helpers import ROOT
MOE_YAML = os.path.join(ROOT, "experiments", "debug_moe.yaml")
EC = ["model.moe.router=expert_choice", "model.moe.aux_loss_coef=0", "model.moe.capacity_factor=1"]
HASH = ["model.moe.router=hash", "model.moe.aux_loss_coef=0"]


def check(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(load_config(MOE_YAML, overrides))


@pytest.mark.parametrize("overrides,match", [
    (["model.moe.router=nope"], r"unknown router 'nope'; known: expert_choice, hash, sinkhorn, switch, topk"),
    # expert choice
    (["model.moe.router=expert_choice", "model.moe.aux_loss_coef=0"], r"model\.moe\.capacity_factor must be > 0"),
    (EC[:2] + ["model.moe.capacity_factor=0"], r"model\.moe\.capacity_factor must be > 0"),
    (EC + ["model.moe.capacity_factor=3"], r"capacity_factor \(3\.0\) x model\.moe\.top_k \(2\)"),
    (EC + ["model.moe.top_k=4", "model.moe.capacity_factor=1.5"], r"model\.moe\.top_k"),
    (["model.moe.router=expert_choice", "model.moe.capacity_factor=1"], r"model\.moe\.aux_loss_coef=0\.01"),
    (EC + ["model.moe.bias_update_rate=0.001"], r"model\.moe\.bias_update_rate"),
    (EC + ["model.moe.drop_policy=position"], r"model\.moe\.drop_policy must be probs"),
    (EC + ["model.moe.random_routing=true"], r"model\.moe\.random_routing"),
    (EC + ["model.moe.n_groups=2", "model.moe.topk_groups=1"], r"model\.moe\.n_groups"),
    # switch
    (["model.moe.router=switch"], r"model\.moe\.top_k=1"),
    # hash
    (HASH + ["model.moe.noisy_gating=true"], r"router=hash.*model\.moe\.noisy_gating"),
    (HASH + ["model.moe.jitter_eps=0.01"], r"router=hash.*model\.moe\.jitter_eps"),
    (["model.moe.router=hash"], r"router=hash.*model\.moe\.aux_loss_coef"),
    (HASH + ["model.moe.bias_update_rate=0.01"], r"model\.moe\.bias_update_rate"),
    (HASH + ["model.moe.seq_aux_loss_coef=0.01"], r"model\.moe\.seq_aux_loss_coef"),
    # sinkhorn
    (["model.moe.router=sinkhorn", "model.moe.bias_update_rate=0.01"], r"router=sinkhorn.*bias_update_rate"),
    # group-limited routing
    (["model.moe.n_groups=3", "model.moe.topk_groups=1"], r"model\.moe\.n_groups \(3\) must divide model\.moe\.num_experts \(4\)"),
    (["model.moe.n_groups=2", "model.moe.topk_groups=3"], r"model\.moe\.topk_groups \(3\) must be <= model\.moe\.n_groups \(2\)"),
    (["model.moe.n_groups=2"], r"model\.moe\.n_groups and model\.moe\.topk_groups"),
    (["model.moe.topk_groups=1"], r"model\.moe\.n_groups and model\.moe\.topk_groups"),
    (["model.moe.n_groups=4", "model.moe.topk_groups=1", "model.moe.top_k=2"], r"model\.moe\.top_k \(2\) exceeds"),
    (["model.moe.n_groups=2", "model.moe.topk_groups=2", "model.moe.top_k=1"], r"model\.moe\.topk_groups \(2\) must be <= model\.moe\.top_k"),
    # coefficients and knobs
    (["model.moe.aux_loss_coef=-0.1"], r"model\.moe\.aux_loss_coef must be >= 0"),
    (["model.moe.seq_aux_loss_coef=-1"], r"model\.moe\.seq_aux_loss_coef must be >= 0"),
    (["model.moe.global_aux_loss_coef=-1"], r"model\.moe\.global_aux_loss_coef must be >= 0"),
    (["model.moe.z_loss_coef=-1"], r"model\.moe\.z_loss_coef must be >= 0"),
    (["model.moe.bias_update_rate=-0.001"], r"model\.moe\.bias_update_rate must be >= 0"),
    (["model.moe.aux_loss_coef=nan"], r"model\.moe\.aux_loss_coef"),
    (["model.moe.jitter_eps=1.5"], r"model\.moe\.jitter_eps"),
    (["model.moe.sinkhorn_iters=0"], r"model\.moe\.sinkhorn_iters"),
    (["model.moe.random_routing=true", "model.moe.top_k=1"], r"model\.moe\.random_routing.*model\.moe\.top_k=2"),
    # capacity
    (["model.moe.capacity_factor=-1"], r"model\.moe\.capacity_factor"),
    (["model.moe.eval_capacity_factor=-0.5"], r"model\.moe\.eval_capacity_factor"),
    (["model.moe.drop_policy=position"], r"model\.moe\.drop_policy=position has no effect.*capacity_factor"),
])
def test_bad_router_settings(overrides, match):
    check(overrides, match)


@pytest.mark.parametrize("overrides", [
    EC,
    ["model.moe.router=switch", "model.moe.top_k=1", "model.moe.capacity_factor=1.25", "model.moe.jitter_eps=0.01"],
    HASH,
    HASH + ["model.moe.top_k=1", "model.moe.z_loss_coef=0"],
    ["model.moe.router=sinkhorn", "model.moe.aux_loss_coef=0"],
    ["model.moe.score_func=sigmoid", "model.moe.bias_update_rate=0.001", "model.moe.n_groups=2",
     "model.moe.topk_groups=1", "model.moe.seq_aux_loss_coef=0.0001", "model.moe.aux_loss_coef=0"],
    ["model.moe.noisy_gating=true", "model.moe.random_routing=true", "model.moe.capacity_factor=2",
     "model.moe.drop_policy=position"],
    ["model.moe.global_aux_loss_coef=0.01", "model.moe.num_shared_experts=3"],
])
def test_good_router_settings(overrides):
    validate(load_config(MOE_YAML, overrides))


def test_every_router_experiment_config_validates():
    paths = sorted(glob.glob(os.path.join(ROOT, "experiments", "routers", "*.yaml")))
    assert len(paths) >= 10
    routers = set()
    for path in paths:
        cfg = load_config(path)
        validate(cfg)
        routers.add(cfg.model.moe.router)
    assert routers == set(ROUTERS)  # every family has an experiment


# ------------------------------------------------------------------------ moe.routing.check_config


def _model(**moe_kw):
    return ModelConfig(moe=MoEConfig(**{"num_experts": 4, **moe_kw}))


def test_check_config_accepts_every_router_family():
    check_config(_model(router="topk"), ParallelConfig())
    check_config(_model(router="switch", top_k=1), ParallelConfig(ep_size=2))
    check_config(_model(router="expert_choice", capacity_factor=1.0, aux_loss_coef=0), ParallelConfig(ep_size=4))
    check_config(_model(router="sinkhorn"), ParallelConfig())
    check_config(_model(router="hash", aux_loss_coef=0), ParallelConfig())


def test_check_config_refuses_an_unknown_router_but_not_for_a_dense_model():
    with pytest.raises(ConfigError, match=r"^model\.moe\.router: unknown router 'nope'; known: expert_choice, hash, "
                                          r"sinkhorn, switch, topk$"):
        check_config(_model(router="nope"), ParallelConfig())
    with pytest.raises(ConfigError, match=r"unknown router 'nope'"):
        check_router_name(_model(router="nope").moe)
    check_config(_model(router="nope", num_experts=0), ParallelConfig())
    check_router_name(MoEConfig(router="nope"))


def test_check_config_runs_the_family_checks_then_the_expert_parallel_layout():
    with pytest.raises(ConfigError, match=r"^model\.moe\.router=switch sends each token to one expert"):
        check_config(_model(router="switch", top_k=2), ParallelConfig(ep_size=3))  # the family's check first
    with pytest.raises(ConfigError, match=r"^parallel\.ep_size \(3\) must divide model\.moe\.num_experts \(4\)$"):
        check_config(_model(), ParallelConfig(ep_size=3))


def test_check_config_refuses_expert_parallel_for_a_router_that_needs_every_rank():
    class GlobalRouter(TopKRouter):
        supports_expert_parallel = False
        expert_parallel_reason = "it selects over the whole global batch"

    ROUTERS["global_test"] = GlobalRouter
    try:
        check_config(_model(router="global_test"), ParallelConfig(ep_size=1))
        with pytest.raises(ConfigError, match=r"^model\.moe\.router=global_test cannot run expert-parallel "
                                              r"\(parallel\.ep_size=2\): it selects over the whole global batch; "
                                              r"use parallel\.ep_size=1$"):
            check_config(_model(router="global_test"), ParallelConfig(ep_size=2))
    finally:
        del ROUTERS["global_test"]
