"""End to end through the CLI and the DeepSpeed engine (each run in its own process)."""
import json
import os

import pytest

from tests.helpers import read_metrics, run_moe


def train(workdir, config, *overrides, data_cache, check=True, env=None):
    return run_moe(["train", f"experiments/{config}.yaml", f"data.cache_dir={data_cache}", *overrides],
                   cwd=workdir, check=check, env_extra=env)


def train_losses(run_dir):
    return [(m["step"], m["loss/train"]) for m in read_metrics(run_dir) if "loss/train" in m]


@pytest.mark.slow
def test_moe_loss_falls_and_run_folder_is_complete(workdir, data_cache):
    train(workdir, "debug_moe", "train.steps=40", "train.log_every=5", "checkpoint.every=20", data_cache=data_cache)
    run = workdir / "runs" / "debug_moe"
    losses = [l for _, l in train_losses(run)]
    assert losses[-1] < losses[0] - 0.5, losses
    summary = json.loads((run / "summary.json").read_text())
    for key in ("train_loss", "val_loss", "tokens", "steps", "params_total", "params_active", "flops_per_token",
                "tokens_per_s", "wall_s"):
        assert summary[key] is not None, key
    assert summary["status"] == "finished" and summary["steps"] == 40 and summary["model_type"] == "moe"
    assert summary["params_active"] < summary["params_total"]
    assert (run / "config.yaml").exists() and (run / "tokenizer.json").exists()
    assert (run / "checkpoints" / "latest").read_text() == "step_00000040"
    line = next(m for m in read_metrics(run) if "loss/train" in m)
    for layer in (0, 1):
        load = line[f"router/layer{layer}/load"]
        assert len(load) == 4 and abs(sum(load) - 1) < 1e-4
        assert f"router/layer{layer}/aux_loss" in line and f"router/layer{layer}/entropy" in line
        assert line[f"router/layer{layer}/logit_lse2"] > 0
    assert any("loss/val" in m for m in read_metrics(run))
    # W&B offline run exists with the same keys
    assert list((run / "wandb").glob("offline-run-*"))

    # sampling and evaluation of the trained run
    out = run_moe(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "1"], cwd=workdir)
    assert out.stdout.startswith("def ") and len(out.stdout) > 10
    sample = workdir / "sample.txt"
    sample.write_text(open(os.__file__).read())
    ev = run_moe(["eval", str(run), "--data", str(sample), "--max-batches", "4"], cwd=workdir)
    result = json.loads(ev.stdout)
    assert 0 < result["loss"] < 6 and result["ppl"] > 1


@pytest.mark.slow
def test_resume_gives_identical_loss_curve(workdir, data_cache):
    """Bitwise resume, here of a grouped-query attention model with QK-norm over the projections (the
    default multi-head model resumes in tests/integration/test_checkpoint_*.py)."""
    common = ["train.steps=12", "train.log_every=1", "train.eval_every=0", "checkpoint.every=6",
              "model.n_kv_heads=1", "model.qk_norm=proj"]
    out = train(workdir, "debug_moe", *common, "run.name=straight", "logging.wandb.mode=disabled",  # reference only
                data_cache=data_cache)
    assert "freed host memory kept for reuse" in out.stdout  # train.keep_freed_memory defaults to true
    # interrupted: stop after 6 steps, then the same command with the full step count resumes (here
    # with the host-memory policy off: a resumable key, and it must not change any number)
    train(workdir, "debug_moe", *common, "train.steps=6", "run.name=resumed", data_cache=data_cache)
    out = train(workdir, "debug_moe", *common, "run.name=resumed", "train.keep_freed_memory=false",
                data_cache=data_cache)
    assert "resuming from step_00000006" in out.stdout
    assert "freed host memory returned to the OS" in out.stdout
    straight = train_losses(workdir / "runs" / "straight")
    resumed = train_losses(workdir / "runs" / "resumed")
    assert [s for s, _ in resumed] == list(range(1, 13))
    assert resumed == straight  # bitwise: same data order, RNG, optimizer and scheduler state


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_gloo_matches_one_process(workdir, data_cache):
    """Data parallelism through the DeepSpeed engine: 2 ranks x 2 sequences == 1 rank x 4 sequences."""
    import subprocess
    import sys

    common = ["train.steps=6", "train.log_every=1", "train.eval_every=0", "checkpoint.every=0",
              "train.global_batch_size=4", f"data.cache_dir={data_cache}"]
    train(workdir, "debug_moe", *common, "train.micro_batch_size=4", "run.name=one", "logging.wandb.mode=disabled",
          data_cache=data_cache)  # the reference curve only: no W&B run
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "moe.cli", "train", "experiments/debug_moe.yaml", *common,
                           "train.micro_batch_size=2", "run.name=two"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = train_losses(workdir / "runs" / "one")
    two = train_losses(workdir / "runs" / "two")
    assert [s for s, _ in one] == [s for s, _ in two]
    for (_, a), (_, b) in zip(one, two):
        assert abs(a - b) < 1e-4 * abs(a), (one, two)


def test_bad_config_fails_fast_with_key(workdir, data_cache):
    proc = train(workdir, "debug_moe", "model.moe.top_k=9", data_cache=data_cache, check=False)
    assert proc.returncode != 0
    assert "model.moe.top_k" in proc.stderr
    assert not (workdir / "runs").exists()  # nothing was created


def test_unknown_key_fails_fast(workdir, data_cache):
    proc = train(workdir, "debug_moe", "train.stepz=3", data_cache=data_cache, check=False)
    assert proc.returncode != 0 and "stepz" in proc.stderr


@pytest.mark.slow
def test_run_folder_with_other_config_is_not_overwritten(workdir, data_cache):
    train(workdir, "debug_dense", "train.steps=2", "train.eval_every=0", data_cache=data_cache)
    run = workdir / "runs" / "debug_dense"
    before = (run / "config.yaml").read_text()
    proc = train(workdir, "debug_dense", "train.steps=2", "model.n_layers=3", data_cache=data_cache, check=False)
    assert proc.returncode != 0 and "model.n_layers" in proc.stderr and "run.overwrite" in proc.stderr
    assert (run / "config.yaml").read_text() == before
    assert (run / "checkpoints" / "latest").exists()
    # asked explicitly: the old run is moved aside, not deleted
    train(workdir, "debug_dense", "train.steps=2", "model.n_layers=3", "run.overwrite=true", "train.eval_every=0",
          data_cache=data_cache)
    aside = [p for p in (workdir / "runs").iterdir() if p.name.startswith("debug_dense.old-")]
    assert len(aside) == 1 and (aside[0] / "config.yaml").read_text() == before


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_launcher(workdir, data_cache):
    """`deepspeed --num_gpus 2 --module moe.cli train ...` (it passes --local_rank before the subcommand)."""
    import subprocess
    import sys

    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run([launcher, "--num_gpus", "2", "--module", "moe.cli", "train", "experiments/debug_moe.yaml",
                           f"data.cache_dir={data_cache}", "train.steps=3", "train.eval_every=0",
                           "train.global_batch_size=8", "run.name=ds"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((workdir / "runs" / "ds" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 3
