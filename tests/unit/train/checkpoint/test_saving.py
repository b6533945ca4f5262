"""moe/train/checkpoint/saving.py: what `save` writes from a real single-process DeepSpeed engine (built
and stepped in one child process, with what the engine held at each save written beside it): every
tensor full-size under its global name, experts one by one, the optimizer moments, meta.json,
trainer.json, the readable copies and the manifest; `latest` and pruning; nothing written when a
tensor is not finite. `model_tensors`, `expert_meta` and `shard_name` in this process."""
import json
import os
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moe.nn.gpt import GPT
from moe.train.checkpoint import integrity
from moe.train.checkpoint.saving import expert_meta, model_tensors, shard_name
from moe.train.checkpoint.trainer_state import read_trainer
from tests.helpers import run_engine_script, tiny_gpt_config

# one worker runs this module, so its engine subprocess (module fixture) runs once
pytestmark = pytest.mark.xdist_group("engine_saving")

BODY = """
from moe.errors import TrainingDiverged
from moe.train.checkpoint import saving
from moe.train.resume import new_state, rng_state


cfg = config("model.moe.bias_update_rate=0.01", "model.moe.global_aux_loss_coef=0.01")
s = build_training(cfg, 1)
sampler = sampler_of(s, cfg)
ck = os.path.join(OUT, "checkpoints")
state = new_state()
listings = {}


def save(n):
    state.update(step=n, tokens=n * 128, sampler=sampler.state_dict(), rng=rng_state(), wandb_id="w123")
    tag = saving.save(s.engine, ck, n, state, to_yaml(cfg), cfg.checkpoint.keep_last, 0)
    listings[n] = sorted(os.listdir(ck))
    return tag


def held(name):
    named = list(s.model.named_parameters())
    save_tensors(name + "_params", dict(named))
    save_tensors(name + "_moments", {f"{k}/{n}": s.optimizer.state[p][k] for n, p in named
                                     for k in ("exp_avg", "exp_avg_sq")})
    save_tensors(name + "_buffers", {n: b for n, b in s.model.state_dict().items()
                                     if n.endswith(("expert_bias", "global_load"))})
    dump(name + "_engine", {"global_steps": s.engine.global_steps, "global_samples": s.engine.global_samples,
                            "skipped_steps": s.engine.skipped_steps, "last_epoch": s.scheduler.last_epoch,
                            "adam_step": int(s.optimizer.state[s.model.embed.weight]["step"]),
                            "config": to_yaml(cfg), "sampler": sampler.state_dict()})


step(s, sampler)
step(s, sampler)
tags = [save(2)]
step(s, sampler)
tags += [save(3), save(3)]  # the same step again replaces it
step(s, sampler)
held("at4")
tags += [save(4)]
with torch.no_grad():
    s.model.embed.weight[0, 0] = float("nan")
try:
    save(5)
    error = None
except TrainingDiverged as exc:
    error = str(exc)
dump("series", {"tags": tags, "listings": listings, "nan_error": error, "after_nan": sorted(os.listdir(ck))})
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory, text_corpus, data_cache):
    out = run_engine_script(tmp_path_factory.mktemp("saving"), BODY, text_corpus, data_cache)
    return types.SimpleNamespace(out=out, ckpt=os.path.join(out, "checkpoints"),
                                 series=json.load(open(os.path.join(out, "series.json"))),
                                 engine=json.load(open(os.path.join(out, "at4_engine.json"))),
                                 params=load_file(os.path.join(out, "at4_params.safetensors")),
                                 moments=load_file(os.path.join(out, "at4_moments.safetensors")),
                                 buffers=load_file(os.path.join(out, "at4_buffers.safetensors")))


EXPERTS = ("blocks.0.ffn.experts", "blocks.1.ffn.experts")
STEP = "step_00000004"


def _tensors(saved, name, step=STEP):
    return load_file(os.path.join(saved.ckpt, step, name))


def test_shard_names():
    assert shard_name(0, 1) == "experts-ep000-of001.safetensors"
    assert shard_name(3, 16) == "experts-ep003-of016.safetensors"


def test_model_tensors_split_dense_aliases_buffers_and_experts():
    model = GPT(tiny_gpt_config("model.moe.num_experts=4", "model.moe.bias_update_rate=0.01").model)
    dense, aliases, buffers, expert_layers = model_tensors(model)
    names = [n for n, _ in dense]
    assert names == [n for n, _ in model.named_parameters() if ".experts." not in n]
    assert not any(n.startswith("head.") for n in names)  # tied: stored once, as embed.weight
    assert aliases == {"head.weight": "embed.weight"}
    assert set(buffers) == {"blocks.0.ffn.router.expert_bias", "blocks.1.ffn.router.expert_bias"}
    assert list(expert_layers) == list(EXPERTS)
    assert expert_layers[EXPERTS[0]] is model.blocks[0].ffn.experts
    untied = GPT(tiny_gpt_config("model.tie_embeddings=false").model)
    d, a, b, e = model_tensors(untied)
    assert "head.weight" in [n for n, _ in d] and a == {} and b == {} and e == {}


def test_expert_meta_is_the_global_count_and_per_expert_shapes():
    model = GPT(tiny_gpt_config("model.moe.num_experts=4", "model.moe.expert_hidden=24").model)
    meta = expert_meta(model_tensors(model)[3])
    assert meta == {p: {"num_experts": 4, "tensors": {"w13": [48, 32], "w2": [32, 24]}} for p in EXPERTS}


def test_the_step_folder_holds_exactly_the_format_files(saved):
    assert sorted(os.listdir(os.path.join(saved.ckpt, STEP))) == sorted(
        ["config.yaml", "experts-ep000-of001.safetensors", "manifest.json", "meta.json", "model.safetensors",
         "optimizer.safetensors", "train_state.json", "trainer.json"])
    assert integrity.verify(os.path.join(saved.ckpt, STEP)) == []


def test_model_file_holds_the_dense_masters_and_the_balancing_buffers(saved):
    model = _tensors(saved, "model.safetensors")
    dense = {n: t for n, t in saved.params.items() if ".experts." not in n}
    assert set(model) == set(dense) | set(saved.buffers)
    assert "head.weight" not in model and not any(".experts." in n for n in model)
    for name, t in {**dense, **saved.buffers}.items():
        assert model[name].dtype == torch.float32
        assert torch.equal(model[name], t), name
    assert saved.buffers["blocks.0.ffn.router.expert_bias"].abs().sum() > 0  # four steps moved the bias


def test_optimizer_file_holds_the_dense_moments(saved):
    optim = _tensors(saved, "optimizer.safetensors")
    expected = {k: v for k, v in saved.moments.items() if ".experts." not in k}
    assert set(optim) == set(expected)
    for key, t in expected.items():
        assert torch.equal(optim[key], t), key
    assert optim["exp_avg_sq/embed.weight"].abs().sum() > 0


def test_experts_are_stored_one_by_one_under_their_global_id(saved):
    shard = _tensors(saved, "experts-ep000-of001.safetensors")
    expected = {}
    for layer in EXPERTS:
        for t in ("w13", "w2"):
            for e in range(4):
                expected[f"{layer}.{e}.{t}"] = saved.params[f"{layer}.{t}"][e]
                for k in ("exp_avg", "exp_avg_sq"):
                    expected[f"{k}/{layer}.{e}.{t}"] = saved.moments[f"{k}/{layer}.{t}"][e]
    assert set(shard) == set(expected)
    for key, t in expected.items():
        assert torch.equal(shard[key], t), key
    with safe_open(os.path.join(saved.ckpt, STEP, "experts-ep000-of001.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "moe-layout-free", "ep_rank": "0", "ep_size": "1"}


def test_meta_json_describes_the_folder(saved):
    meta = json.load(open(os.path.join(saved.ckpt, STEP, "meta.json")))
    model = _tensors(saved, "model.safetensors")
    assert (meta["format"], meta["version"], meta["step"], meta["expert_shards"]) == ("moe-layout-free", 2, 4, 1)
    assert meta["saved_with"] == {"world_size": 1, "ep_size": 1, "zero_stage": 0, "dtype": "float32"}
    assert meta["tensors"] == {n: {"shape": list(t.shape), "kind": "buffer" if n in saved.buffers else "param"}
                               for n, t in model.items()}
    assert meta["aliases"] == {"head.weight": "embed.weight"}
    assert meta["experts"] == {p: {"num_experts": 4, "tensors": {"w13": [64, 32], "w2": [32, 32]}} for p in EXPERTS}
    assert meta["optimizer"] == {"moments": ["exp_avg", "exp_avg_sq"], "step": saved.engine["adam_step"]}
    assert saved.engine["adam_step"] == 4


def test_trainer_state_scheduler_and_engine_counters(saved):
    folder = os.path.join(saved.ckpt, STEP)
    trainer = read_trainer(folder)
    state = trainer["train_state"]
    assert (state["step"], state["tokens"], state["wandb_id"]) == (4, 512, "w123")
    assert state["sampler"] == saved.engine["sampler"]
    assert set(state["rng"]) == {"python", "numpy", "torch"}
    assert trainer["scheduler"]["last_epoch"] == saved.engine["last_epoch"] == 4
    assert trainer["engine"] == {k: saved.engine[k] for k in ("global_steps", "global_samples", "skipped_steps")}
    assert trainer["engine"]["global_steps"] == 4
    readable = json.load(open(os.path.join(folder, "train_state.json")))
    assert readable == {k: v for k, v in json.load(open(os.path.join(folder, "trainer.json")))["train_state"].items()
                        if k != "rng"}
    assert open(os.path.join(folder, "config.yaml")).read() == saved.engine["config"]


def test_latest_names_each_new_save_and_older_folders_are_pruned(saved):
    s = saved.series
    assert s["tags"] == ["step_00000002", "step_00000003", "step_00000003", "step_00000004"]
    assert s["listings"] == {"2": ["latest", "step_00000002"],
                             "3": ["latest", "step_00000002", "step_00000003"],
                             "4": ["latest", "step_00000003", "step_00000004"]}  # keep_last 2 (debug config)
    assert open(os.path.join(saved.ckpt, "latest")).read().strip() == "step_00000004"
    for tag in ("step_00000003", "step_00000004"):
        assert integrity.verify(os.path.join(saved.ckpt, tag)) == [], tag


def test_a_non_finite_tensor_is_refused_before_anything_is_written(saved):
    s = saved.series
    assert s["nan_error"] == "step 5: 1 tensors hold non-finite values (here: embed.weight); no checkpoint was written"
    assert s["after_nan"] == ["latest", "step_00000003", "step_00000004"]  # no .tmp-step_00000005 either
