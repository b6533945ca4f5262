"""moe/train/checkpoint/optimizer_state.py: `OptimizerState` reads and writes the full fp32 masters and
Adam moments of every parameter, through real single-process DeepSpeed engines built in one child
process: a plain torch AdamW (no ZeRO; fp32 masters are the parameters, the moments after a step are
those of a torch AdamW fed the same gradients) and ZeRO stage 1 (the fragment API gives the same full
tensors as the plain engine after the same step); `prepare` and `set`."""
import json
import os
import types

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import run_engine_script

# one worker runs this module, so its engine subprocess (module fixture) runs once
pytestmark = pytest.mark.xdist_group("engine_optimizer_state")

BODY = """
from moe.nn.gpt import GPT
from moe.parallel import build_engine
from moe.train.build import seed_everything
from moe.train.checkpoint.optimizer_state import OptimizerState
from safetensors.torch import load_file


cfg = config("train.grad_clip=0")  # no clipping: the reference sees the engine's gradients as they are
s = build_training(cfg, 1)
named = list(s.model.named_parameters())
save_tensors("initial", dict(named))
fresh = OptimizerState(s.engine)
info = {"fresh": {"kind": fresh.kind, "inner_is_torch_adamw": fresh.inner is s.optimizer, "has_state": fresh.has_state(),
                  "keys": fresh.keys, "step_count": fresh.step_count(),
                  "moments": {n: sorted(fresh.get_moments(p)) for n, p in named[:2]}}}
save_tensors("fresh_masters", {n: fresh.get_master(p) for n, p in named})

# the reference: a torch AdamW with the same groups and hyperparameters on copies, fed the same gradients
copies = {id(p): p.detach().clone().requires_grad_(True) for _, p in named}
ref = torch.optim.AdamW([{**{k: v for k, v in g.items() if k != "params"}, "params": [copies[id(p)] for p in g["params"]]}
                         for g in s.optimizer.param_groups])


def capture(norm):
    for _, p in named:
        copies[id(p)].grad = p.grad.detach().clone()


step(s, sampler_of(s, cfg), before_step=capture)
ref.step()
opt = OptimizerState(s.engine)
info["stepped"] = {"has_state": opt.has_state(), "keys": opt.keys, "step_count": opt.step_count()}
save_tensors("masters", {n: opt.get_master(p) for n, p in named})
save_tensors("moments", {f"{k}/{n}": v for n, p in named for k, v in opt.get_moments(p).items()})
save_tensors("ref_params", {n: copies[id(p)] for n, p in named})
save_tensors("ref_moments", {f"{k}/{n}": ref.state[copies[id(p)]][k] for n, p in named for k in ("exp_avg", "exp_avg_sq")})

# ZeRO 1: the same model, batch and step through the partitioned optimizer
zcfg = config("train.grad_clip=0", "train.zero_stage=1", "model.vocab_size=257")
seed_everything(zcfg.run.seed)
zmodel = GPT(zcfg.model)
zmodel.load_state_dict(dict(load_file(os.path.join(OUT, "initial.safetensors"))), strict=False)
zengine, zoptimizer, _, _ = build_engine(zmodel, zcfg, s.dist_info, 1)
zs = type(s)(s.dist_info, s.data, zmodel, zengine, zoptimizer, None, s.dtype, 1, {}, False)
znamed = list(zmodel.named_parameters())
zfresh = OptimizerState(zengine)
info["zero_fresh"] = {"kind": zfresh.kind, "has_state": zfresh.has_state(), "flats": len(zfresh.flats)}
save_tensors("zero_fresh_masters", {n: zfresh.get_master(p) for n, p in znamed})
step(zs, sampler_of(s, cfg))
zopt = OptimizerState(zengine)
info["zero_stepped"] = {"kind": zopt.kind, "has_state": zopt.has_state(), "keys": zopt.keys,
                        "step_count": zopt.step_count()}
save_tensors("zero_masters", {n: zopt.get_master(p) for n, p in znamed})
save_tensors("zero_moments", {f"{k}/{n}": v for n, p in znamed for k, v in zopt.get_moments(p).items()})
# set through the fragments: the full tensors read back, and the parameter follows
zp = dict(znamed)["blocks.0.attn.qkv.weight"]
zopt.set(zp, torch.full(zp.shape, 0.25), {"exp_avg": torch.full(zp.shape, 0.5), "exp_avg_sq": torch.full(zp.shape, 2.0)})
info["zero_set"] = {"param": float(zp.detach().abs().max()), "master": sorted(set(zopt.get_master(zp).flatten().tolist())),
                    "moments": {k: sorted(set(v.flatten().tolist())) for k, v in zopt.get_moments(zp).items()}}

# prepare and set on the plain engine
p = dict(named)["embed.weight"]
before = {k: v.clone() for k, v in opt.get_moments(p).items()}
opt.prepare(9, ["exp_avg", "exp_avg_sq"])
info["prepared"] = {"step_count": opt.step_count(),
                    "moments_kept": all(torch.equal(before[k], v) for k, v in opt.get_moments(p).items())}
master, m1, m2 = torch.full(p.shape, 0.5), torch.full(p.shape, 0.125), torch.full(p.shape, 0.25)
opt.set(p, master, {"exp_avg": m1, "exp_avg_sq": m2})
m1.fill_(7.0)  # the state holds copies
info["set"] = {"param": sorted(set(p.detach().flatten().tolist())), "master": sorted(set(opt.get_master(p).flatten().tolist())),
               "moments": {k: sorted(set(v.flatten().tolist())) for k, v in opt.get_moments(p).items()}}

# prepare on an optimizer that never stepped creates the state a load writes into
other, _, _, _ = build_engine(GPT(cfg.model), cfg, s.dist_info, 1)
o = OptimizerState(other)
o.prepare(5, ["exp_avg", "exp_avg_sq"])
q = next(other.module.parameters())
info["prepared_fresh"] = {"has_state": o.has_state(), "step_count": o.step_count(), "keys": o.keys,
                          "zeros": all(not v.any() and v.shape == q.shape for v in o.get_moments(q).values()),
                          "groups_with_state": sum(all(x in o.inner.state for x in g["params"]) for g in o.inner.param_groups),
                          "groups": len(o.inner.param_groups)}
dump("info", info)
"""


@pytest.fixture(scope="module")
def result(tmp_path_factory, text_corpus, data_cache):
    out = run_engine_script(tmp_path_factory.mktemp("optimizer_state"), BODY, text_corpus, data_cache)
    tensors = {name[:-12]: load_file(os.path.join(out, name)) for name in os.listdir(out)
               if name.endswith(".safetensors")}
    return types.SimpleNamespace(info=json.load(open(os.path.join(out, "info.json"))), **tensors)


def _assert_equal(a, b, tol=0.0):
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for k in a:
        if tol:
            torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol * 1e-2, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def test_before_any_step_there_are_masters_and_no_moments(result):
    assert result.info["fresh"] == {"kind": "plain", "inner_is_torch_adamw": True, "has_state": False,
                                    "keys": ["exp_avg", "exp_avg_sq"], "step_count": 0,
                                    "moments": {"embed.weight": [], "blocks.0.attn_norm.weight": []}}
    _assert_equal(result.fresh_masters, result.initial)  # the fp32 parameters themselves


def test_after_a_step_masters_and_moments_equal_torch_adamw(result):
    assert result.info["stepped"] == {"has_state": True, "keys": ["exp_avg", "exp_avg_sq"], "step_count": 1}
    _assert_equal(result.masters, result.ref_params, tol=1e-6)
    _assert_equal(result.moments, result.ref_moments, tol=1e-6)
    assert any(not torch.equal(result.masters[k], result.initial[k]) for k in result.initial)  # it did move
    assert result.moments["exp_avg_sq/blocks.0.ffn.experts.w13"].abs().sum() > 0  # experts included


def test_zero_1_reads_the_same_full_tensors_through_the_fragments(result):
    assert result.info["zero_fresh"] == {"kind": "fragments", "has_state": False, "flats": 2}
    _assert_equal(result.zero_fresh_masters, result.initial)
    assert result.info["zero_stepped"] == {"kind": "fragments", "has_state": True, "keys": ["exp_avg", "exp_avg_sq"],
                                           "step_count": 1}
    _assert_equal(result.zero_masters, result.masters, tol=1e-5)
    _assert_equal(result.zero_moments, result.moments, tol=1e-5)


def test_set_writes_the_parameter_its_master_and_its_moments(result):
    expected = {"master": [0.5], "moments": {"exp_avg": [0.125], "exp_avg_sq": [0.25]}}
    assert result.info["set"] == {"param": [0.5], **expected}
    assert result.info["zero_set"] == {"param": 0.25, "master": [0.25],
                                       "moments": {"exp_avg": [0.5], "exp_avg_sq": [2.0]}}


def test_prepare_sets_the_step_and_creates_missing_moments_only(result):
    assert result.info["prepared"] == {"step_count": 9, "moments_kept": True}
    fresh = result.info["prepared_fresh"]
    assert fresh == {"has_state": True, "step_count": 5, "keys": ["exp_avg", "exp_avg_sq"], "zeros": True,
                     "groups_with_state": fresh["groups"], "groups": fresh["groups"]}
    assert fresh["groups"] >= 2
