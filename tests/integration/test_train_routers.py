"""End to end through `moe train` (tiny debug_moe runs, each in its own process): every router
family trains; balancing is layout invariant and measurably works; the balancing bias survives
a resume."""
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import read_metrics, run_moe

FAMILIES = {
    "switch": ["model.moe.router=switch", "model.moe.top_k=1", "model.moe.capacity_factor=1.25",
               "model.moe.jitter_eps=0.01"],
    "expert_choice": ["model.moe.router=expert_choice", "model.moe.capacity_factor=1.0", "model.moe.aux_loss_coef=0"],
    "sinkhorn": ["model.moe.router=sinkhorn", "model.moe.aux_loss_coef=0"],
    "hash": ["model.moe.router=hash", "model.moe.aux_loss_coef=0"],
    "deepseek": ["model.moe.score_func=sigmoid", "model.moe.n_groups=2", "model.moe.topk_groups=1",
                 "model.moe.bias_update_rate=0.01", "model.moe.aux_loss_coef=0", "model.moe.num_shared_experts=1"],
    "gshard_noisy": ["model.moe.random_routing=true", "model.moe.noisy_gating=true", "model.moe.capacity_factor=2"],
}
# balancing losses that must not depend on the layout, and the bias, all on at once
INVARIANT = ["model.moe.aux_loss_coef=0", "model.moe.seq_aux_loss_coef=0.01", "model.moe.global_aux_loss_coef=0.1",
             "model.moe.z_loss_coef=0.001", "model.moe.bias_update_rate=0.01"]


def train(workdir, data_cache, *overrides, check=True):
    return run_moe(["train", "experiments/debug_moe.yaml", f"data.cache_dir={data_cache}", *overrides],
                   cwd=workdir, check=check, env_extra={"WANDB_MODE": "disabled"})


def train_lines(run_dir):
    return [m for m in read_metrics(run_dir) if "loss/train" in m]


def tail(lines, suffix, fraction=0.5):
    lines = lines[-max(1, int(len(lines) * fraction)):]
    values = [v for m in lines for k, v in m.items() if k.startswith("router/layer") and k.endswith("/" + suffix)]
    return sum(values) / len(values)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_router_family_trains(workdir, data_cache, family):
    train(workdir, data_cache, *FAMILIES[family], "train.steps=16", "train.eval_every=8", "checkpoint.save_final=false",
          f"run.name={family}")
    lines = train_lines(workdir / "runs" / family)
    assert lines[-1]["loss/train"] < lines[0]["loss/train"]
    assert all(abs(sum(m["router/layer0/load"]) - 1) < 1e-4 for m in lines)
    evals = [m for m in read_metrics(workdir / "runs" / family) if "loss/val" in m]
    assert len(evals) == 2 and all(0 < m["loss/val"] < 6 for m in evals)


@pytest.mark.slow
@pytest.mark.distributed
def test_balancing_is_layout_invariant(workdir, data_cache):
    """The same global batch of 4 sequences as 1 x 4 (one rank), 4 x 1 (4 accumulation steps) and
    2 ranks x 2: identical training curves, balancing losses, expert loads and biases."""
    common = ["train.steps=6", "train.log_every=1", "train.eval_every=0", "checkpoint.save_final=false",
              "train.global_batch_size=4", *INVARIANT]
    train(workdir, data_cache, *common, "train.micro_batch_size=4", "run.name=whole")
    out = train(workdir, data_cache, *common, "train.micro_batch_size=1", "run.name=accum")
    assert "grad accum 4" in out.stdout
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "moe.cli", "train", "experiments/debug_moe.yaml", f"data.cache_dir={data_cache}",
                           *common, "train.micro_batch_size=2", "run.name=ranks"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = {name: train_lines(workdir / "runs" / name) for name in ("whole", "accum", "ranks")}
    ref = runs["whole"]
    assert len(ref) == 6
    keys = [k for k in ref[0] if k.startswith("router/") and k.endswith(("global_aux_loss", "seq_aux_loss", "z_loss"))]
    assert len(keys) == 6  # 2 layers x 3 losses
    for name in ("accum", "ranks"):
        for a, b in zip(ref, runs[name]):
            assert a["step"] == b["step"]
            assert b["loss/train"] == pytest.approx(a["loss/train"], rel=1e-4), name
            for k in keys:
                assert b[k] == pytest.approx(a[k], rel=1e-4), (name, k, a["step"])
            for layer in (0, 1):
                assert b[f"router/layer{layer}/tokens_per_expert"] == a[f"router/layer{layer}/tokens_per_expert"]
                assert b[f"router/layer{layer}/bias"] == pytest.approx(a[f"router/layer{layer}/bias"], abs=1e-6)
    # the global loss used the previous step's load: from step 2 on its value moves off the uniform 1
    assert any(abs(m["router/layer0/global_aux_loss"] - 0.1) > 1e-4 for m in ref[1:])


@pytest.mark.slow
def test_balancing_evens_the_load_and_aux_free_matches_the_aux_loss(workdir, data_cache):
    common = ["train.steps=60", "train.log_every=5", "train.eval_every=0", "checkpoint.save_final=false"]
    train(workdir, data_cache, *common, "model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0", "run.name=none")
    train(workdir, data_cache, *common, "model.moe.aux_loss_coef=0.1", "run.name=aux")
    train(workdir, data_cache, *common, "model.moe.aux_loss_coef=0", "model.moe.bias_update_rate=0.01",
          "run.name=free")
    imbalance = {n: tail(train_lines(workdir / "runs" / n), "max_over_mean") for n in ("none", "aux", "free")}
    assert imbalance["none"] > imbalance["aux"] + 0.2, imbalance
    assert imbalance["none"] > imbalance["free"] + 0.2, imbalance
    assert abs(imbalance["free"] - imbalance["aux"]) < 0.25, imbalance
    bias = train_lines(workdir / "runs" / "free")[-1]["router/layer0/bias_range"]
    assert bias > 0


@pytest.mark.slow
def test_bias_and_global_load_survive_resume(workdir, data_cache):
    common = ["train.steps=12", "train.log_every=1", "train.eval_every=0", "checkpoint.every=6",
              "model.moe.bias_update_rate=0.01", "model.moe.global_aux_loss_coef=0.1"]
    train(workdir, data_cache, *common, "run.name=straight")
    train(workdir, data_cache, *common, "train.steps=6", "run.name=resumed")
    from moe.train.checkpoint import loading
    state = loading.load_model_weights(str(workdir / "runs" / "resumed" / "checkpoints"), "step_00000006")
    bias = state["blocks.0.ffn.router.expert_bias"]
    assert bias.dtype == torch.float32 and bias.abs().sum() > 0
    assert "blocks.0.ffn.router.global_load" in state and "blocks.0.ffn.router.step_load" not in state
    out = train(workdir, data_cache, *common, "run.name=resumed")
    assert "resuming from step_00000006" in out.stdout
    straight = train_lines(workdir / "runs" / "straight")
    resumed = train_lines(workdir / "runs" / "resumed")
    assert [m["step"] for m in resumed] == list(range(1, 13))
    for a, b in zip(straight, resumed):  # a lost bias would route differently after step 6
        assert a["loss/train"] == b["loss/train"]
        assert a["router/layer0/bias"] == b["router/layer0/bias"]
