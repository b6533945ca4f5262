"""moe/train/checkpoint/loading.py: `load` restores weights, router state, optimizer moments, the LR
schedule and the engine's counters into a real single-process DeepSpeed engine (one child process:
save at step 2, take step 3, refuse a corrupt copy without changing anything, load step 2, take step 3
again) so the same step gives the same result; `check_compatible`, `consolidated_state_dict`,
`export`, `load_model_weights` and `_fit_scheduler_state` in this process, on that folder, on the
committed format-1 fixture and on small hand-made folders."""
import json
import os
import shutil
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moe.config import config_from_yaml_text
from moe.errors import CheckpointError, CheckpointNotFound
from moe.nn.gpt import GPT
from moe.train.checkpoint import loading
from moe.train.checkpoint.loading import (_fit_scheduler_state, check_compatible, consolidated_state_dict, export,
                                          load_model_weights)
from tests.helpers import ROOT, run_engine_script

# one worker runs this module, so its engine subprocess (module fixture) runs once
pytestmark = pytest.mark.xdist_group("engine_loading")

V1_RUN = os.path.join(ROOT, "tests", "fixtures", "checkpoint_v1", "v1_moe")

BODY = """
import shutil
from moe.errors import CheckpointError
from moe.train.checkpoint import loading, saving
from moe.train.resume import new_state, rng_state


cfg = config("model.moe.bias_update_rate=0.01")
s = build_training(cfg, 1)
sampler = sampler_of(s, cfg)
ck = os.path.join(OUT, "checkpoints")
named = list(s.model.named_parameters())


def everything():
    out = dict(s.model.state_dict())
    out.update({f"{k}/{n}": s.optimizer.state[p][k] for n, p in named for k in ("exp_avg", "exp_avg_sq")})
    return out


def where():
    return {"global_steps": s.engine.global_steps, "global_samples": s.engine.global_samples,
            "last_epoch": s.scheduler.last_epoch, "lr": s.scheduler.get_last_lr(),
            "adam_step": int(s.optimizer.state[named[0][1]]["step"])}


step(s, sampler)
step(s, sampler)
state = new_state()
state.update(step=2, tokens=256, sampler=sampler.state_dict(), rng=rng_state(), wandb_id="w1")
saving.save(s.engine, ck, 2, state, to_yaml(cfg), 2, 0)
info = {"at2": where()}
save_tensors("at2", everything())
position = sampler.state_dict()
first = step(s, sampler)
info["at3"] = where()
save_tensors("at3", everything())

bad = os.path.join(OUT, "bad")
shutil.copytree(ck, bad)
shard = os.path.join(bad, "step_00000002", "experts-ep000-of001.safetensors")
data = bytearray(open(shard, "rb").read())
data[len(data) // 2] ^= 0x10
open(shard, "wb").write(bytes(data))
try:
    loading.load(s.engine, bad, "step_00000002")
    info["corrupt"] = None
except CheckpointError as exc:
    info["corrupt"] = str(exc)
info["after_corrupt"] = where()
save_tensors("after_corrupt", everything())

loaded = loading.load(s.engine, ck, "step_00000002")
info["loaded_state"] = {k: v for k, v in loaded.items() if k != "rng"}
info["loaded_rng_keys"] = sorted(loaded["rng"])
info["after_load"] = where()
save_tensors("loaded", everything())
sampler.load_state_dict(loaded["sampler"])
info["same_position"] = sampler.state_dict() == position
# the optimizer's own LR is set by resume() from this run's schedule (moe/train/resume.py), as here
for group, base in zip(s.optimizer.param_groups, s.scheduler.base_lrs):
    group["lr"] = base * s.scheduler.lr_lambdas[0](s.scheduler.last_epoch)
again = step(s, sampler)
info["steps"] = [[first.loss, first.grad_norm], [again.loss, again.grad_norm]]
info["again"] = where()
save_tensors("again", everything())
dump("info", info)
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, text_corpus, data_cache):
    out = run_engine_script(tmp_path_factory.mktemp("loading"), BODY, text_corpus, data_cache)
    tensors = {name[:-12]: load_file(os.path.join(out, name)) for name in os.listdir(out)
               if name.endswith(".safetensors")}
    return types.SimpleNamespace(out=out, ckpt=os.path.join(out, "checkpoints"),
                                 step2=os.path.join(out, "checkpoints", "step_00000002"),
                                 info=json.load(open(os.path.join(out, "info.json"))), **tensors)


def _same(a, b):
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return [k for k in a if not torch.equal(a[k], b[k])]


def _model_of(folder, *changes):
    cfg = config_from_yaml_text(open(os.path.join(folder, "config.yaml")).read())
    for change in changes:
        change(cfg.model)
    return GPT(cfg.model)


# ---------------------------------------------------------------------------------------- load


def test_load_restores_every_tensor_of_the_saved_step(run):
    assert _same(run.loaded, run.at2) == []
    moved = _same(run.at3, run.at2)
    assert "embed.weight" in moved and "exp_avg/blocks.0.ffn.experts.w13" in moved
    assert "blocks.0.ffn.router.expert_bias" in moved  # the router state came back too


def test_load_restores_the_schedule_counters_and_returns_the_train_state(run):
    info = run.info
    assert info["at3"]["global_steps"] == 3 and info["at3"]["last_epoch"] == 3
    assert info["after_load"] == info["at2"]
    assert info["loaded_state"]["step"] == 2 and info["loaded_state"]["tokens"] == 256
    assert info["loaded_state"]["wandb_id"] == "w1" and info["same_position"]
    assert info["loaded_rng_keys"] == ["numpy", "python", "torch"]


def test_the_same_step_after_loading_gives_the_same_result(run):
    (loss, norm), (loss_again, norm_again) = run.info["steps"]
    assert loss_again == loss and norm_again == norm
    assert _same(run.again, run.at3) == []
    assert run.info["again"] == run.info["at3"]


def test_a_corrupt_folder_is_refused_before_any_state_changes(run):
    message = run.info["corrupt"]
    assert message.startswith(f"{run.out}/bad/step_00000002 is incomplete, corrupt or inconsistent")
    assert "experts-ep000-of001.safetensors: corrupt" in message and "moe ckpt verify" in message
    assert _same(run.after_corrupt, run.at3) == [] and run.info["after_corrupt"] == run.info["at3"]


# ------------------------------------------------------------------------------ check_compatible


def test_the_model_that_saved_it_fits(run):
    meta = json.load(open(os.path.join(run.step2, "meta.json")))
    check_compatible(types.SimpleNamespace(module=_model_of(run.step2)), run.step2, meta)


def test_another_model_is_refused_naming_the_differences(run):
    meta = json.load(open(os.path.join(run.step2, "meta.json")))

    def more_experts(m):
        m.moe.num_experts = 8

    def no_bias(m):
        m.moe.bias_update_rate = 0.0

    def bigger_vocab(m):
        m.vocab_size = 300

    with pytest.raises(CheckpointError) as info:
        check_compatible(types.SimpleNamespace(module=_model_of(run.step2, more_experts)), run.step2, meta)
    message = str(info.value)
    assert message.startswith(f"{run.step2} does not fit this model (")
    assert "blocks.0.ffn.router.weight: checkpoint [4, 32], model [8, 32]" in message
    assert "blocks.0.ffn.experts: checkpoint has 4 experts" in message and "model 8 experts" in message
    with pytest.raises(CheckpointError, match="unexpected blocks.0.ffn.router.expert_bias"):
        check_compatible(types.SimpleNamespace(module=_model_of(run.step2, no_bias)), run.step2, meta)
    with pytest.raises(CheckpointError, match=r"\(1 differences\): embed.weight: checkpoint \[257, 32\], model "
                                              r"\[300, 32\]$"):
        check_compatible(types.SimpleNamespace(module=_model_of(run.step2, bigger_vocab)), run.step2, meta)


# --------------------------------------------------------------- consolidated state dict, export


def test_the_consolidated_state_dict_is_the_ep1_model_state_dict(run):
    state = consolidated_state_dict(run.step2)
    model = _model_of(run.step2)
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state)  # strict
    assert _same({k: v for k, v in state.items() if "/" not in k},
                 {k: v for k, v in run.at2.items() if "/" not in k} | {"head.weight": run.at2["embed.weight"]}) == []
    assert state["blocks.1.ffn.experts.w2"].shape == (4, 32, 32)  # stacked [E, ...]


def test_the_format1_fixture_consolidates_too(tmp_path):
    run_dir = tmp_path / "v1_moe"
    shutil.copytree(V1_RUN, run_dir)
    step = run_dir / "checkpoints" / "step_00000003"
    state = consolidated_state_dict(str(step))
    _model_of(str(step)).load_state_dict(state)
    assert load_model_weights(str(run_dir / "checkpoints")).keys() == state.keys()


def test_a_corrupt_folder_does_not_consolidate(run, tmp_path):
    bad = tmp_path / "step_00000002"
    shutil.copytree(run.step2, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\x7f\x7f\x7f")
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        consolidated_state_dict(str(bad))


def test_export_writes_one_file_with_the_step_and_config(run, tmp_path):
    out = str(tmp_path / "model.safetensors")
    summary = export(run.out, out)  # a run-like folder: resolved through checkpoints/latest
    exported = load_file(out)
    state = consolidated_state_dict(run.step2)
    assert set(exported) == set(state) - {"head.weight"}  # the alias is stored once
    assert _same(exported, {k: state[k] for k in exported}) == []
    assert summary == {"tensors": len(exported), "params": sum(v.numel() for v in exported.values()), "step": 2}
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "moe-export" and meta["step"] == "2"
    assert json.loads(meta["aliases"]) == {"head.weight": "embed.weight"}
    assert meta["config"] == open(os.path.join(run.step2, "config.yaml")).read()


# -------------------------------------------------------------------------- load_model_weights


def test_load_model_weights_finds_the_latest_step(run):
    weights = load_model_weights(run.ckpt)
    assert _same(weights, consolidated_state_dict(run.step2)) == []
    assert load_model_weights(run.ckpt, "step_00000002").keys() == weights.keys()


def test_load_model_weights_without_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFound, match=f"no checkpoint in {tmp_path}"):
        load_model_weights(str(tmp_path))
    (tmp_path / "step_00000001").mkdir()
    with pytest.raises(CheckpointNotFound, match="step_00000001: not a checkpoint"):
        load_model_weights(str(tmp_path), "step_00000001")


def test_load_model_weights_of_deepspeeds_older_format(tmp_path):
    step = tmp_path / "step_00000001"
    step.mkdir()
    torch.save({"module": {"w": torch.arange(3.0)}, "step": 1}, step / loading.LEGACY_MODEL_FILE)
    assert torch.equal(load_model_weights(str(tmp_path), "step_00000001")["w"], torch.arange(3.0))
    torch.save({"optimizer": {}}, step / loading.LEGACY_MODEL_FILE)
    with pytest.raises(CheckpointError, match=r"no model weights \(`module`\) in it"):
        load_model_weights(str(tmp_path), "step_00000001")


# ------------------------------------------------------------------------------ the LR schedule


def test_the_scheduler_state_is_refitted_to_this_optimizers_groups():
    params = [torch.nn.Parameter(torch.ones(1)) for _ in range(3)]
    opt = torch.optim.SGD([{"params": [p]} for p in params], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    saved = {"base_lrs": [0.5, 0.5], "_last_lr": [0.25, 0.25], "last_epoch": 7}
    fitted = _fit_scheduler_state(saved, sched)
    assert fitted == {"base_lrs": [0.5] * 3, "_last_lr": [0.25] * 3, "last_epoch": 7}
    assert saved["base_lrs"] == [0.5, 0.5]  # the saved state is not changed
    same = {"base_lrs": [0.5] * 3, "_last_lr": [0.1, 0.2, 0.3]}
    assert _fit_scheduler_state(same, sched) == same  # the right length already: as it is
    with pytest.raises(CheckpointError, match=r"different base_lrs per parameter group \(\[0.5, 0.1\]\).*3 groups"):
        _fit_scheduler_state({"base_lrs": [0.5, 0.1]}, sched)
