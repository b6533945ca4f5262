"""Layout-free checkpoints: saved at EP=2, resumed at EP=1 and EP=4 on the same loss curve; `moe ckpt
verify` and `moe ckpt export`; a checkpoint that does not fit the model is refused and left as is."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import BALANCING, TOL, assert_close, read_metrics, run_moe


def common(corpus, data_cache):
    return ["experiments/debug_moe.yaml", f"data.dataset={corpus}", f"data.cache_dir={data_cache}",
            "train.micro_batch_size=1", "train.global_batch_size=4", "train.log_every=1", "train.eval_every=0",
            "checkpoint.every=4", "checkpoint.keep_last=3", *BALANCING]


def train(workdir, nproc, args, check=True):
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    proc = subprocess.run([sys.executable, *launcher, "-m", "moe.cli", "train", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def losses(run_dir):
    return [(m["step"], m["loss/train"]) for m in read_metrics(run_dir) if "loss/train" in m]


def copy_run(src, dst):
    """A copy of a run folder under another run.name (the folder's config must name it)."""
    shutil.copytree(src, dst)
    cfg = dst / "config.yaml"
    cfg.write_text(cfg.read_text().replace(f"name: {src.name}\n", f"name: {dst.name}\n", 1))


def tree_hash(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def ep2_run(module_workdir, corpus, data_cache):
    """8 steps at EP=2 with checkpoints at 4 and 8, trained once for the tests of this module (they share
    an xdist group, so one worker runs them and this run)."""
    train(module_workdir, 2, [*common(corpus, data_cache), "parallel.ep_size=2", "train.steps=8", "run.name=straight"])
    return module_workdir / "runs" / "straight"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.xdist_group("ep2_checkpoint")
def test_saved_at_ep2_resumes_at_ep1_and_ep4_on_the_same_curve(ep2_run, corpus, data_cache):
    from moe.train.checkpoint.loading import _global_experts, consolidated_state_dict

    base = common(corpus, data_cache)
    runs = ep2_run.parent
    workdir = runs.parent
    # saved under ZeRO 1 (partitioned optimizer state), resumed without ZeRO and under ZeRO 2
    train(workdir, 2, [*base, "parallel.ep_size=2", "train.zero_stage=1", "train.steps=4", "run.name=cut"])
    copy_run(runs / "cut", runs / "to_ep1")
    copy_run(runs / "cut", runs / "to_ep4")
    out1 = train(workdir, 1, [*base, "parallel.ep_size=1", "train.steps=8", "run.name=to_ep1"])
    out4 = train(workdir, 4, [*base, "parallel.ep_size=4", "train.zero_stage=2", "train.steps=8", "run.name=to_ep4"])
    assert "resuming from step_00000004" in out1.stdout and "world 1, grad accum 4" in out1.stdout
    assert "resuming from step_00000004" in out4.stdout and "world 4, grad accum 1" in out4.stdout

    straight = losses(runs / "straight")
    assert [s for s, _ in straight] == list(range(1, 9))
    for name in ("to_ep1", "to_ep4"):
        resumed = losses(runs / name)
        assert [s for s, _ in resumed] == list(range(1, 9)), name
        for (_, a), (_, b) in zip(resumed[4:], straight[4:]):
            assert abs(a - b) <= TOL * abs(b), (name, resumed, straight)

    # the same weights, router buffers (balancing bias, global load) and Adam moments at the end
    ref = consolidated_state_dict(str(runs / "straight" / "checkpoints" / "step_00000008"))
    # the balancing bias has moved somewhere (sign updates can cancel in one layer over 8 steps), so the
    # comparison below covers a non-trivial router buffer
    assert sum(v.abs().sum() for k, v in ref.items() if k.endswith("router.expert_bias")) > 0
    for name in ("to_ep1", "to_ep4"):
        step8 = runs / name / "checkpoints" / "step_00000008"
        assert_close(consolidated_state_dict(str(step8)), ref, f"{name} final state")
        meta = json.loads((step8 / "meta.json").read_text())
        assert meta["saved_with"]["ep_size"] == int(name[-1]) and meta["expert_shards"] == int(name[-1])
        from safetensors.torch import load_file

        a = load_file(str(step8 / "optimizer.safetensors"))
        b = load_file(str(runs / "straight" / "checkpoints" / "step_00000008" / "optimizer.safetensors"))
        assert_close(a, b, f"{name} non-expert Adam moments")
        for k in meta["optimizer"]["moments"]:
            assert_close(_global_experts(str(step8), meta, f"{k}/"),
                         _global_experts(str(runs / "straight" / "checkpoints" / "step_00000008"), meta, f"{k}/"),
                         f"{name} expert {k}")

    # sizes are the whole model's at any layout (a rank under EP holds a quarter or half of the experts)
    sizes = [{k: v for k, v in json.loads((runs / n / "summary.json").read_text()).items() if k.startswith("params_")}
             for n in ("straight", "to_ep1", "to_ep4")]
    assert sizes[0] == sizes[1] == sizes[2] and sizes[0]["params_active"] < sizes[0]["params_total"], sizes

    # the EP runs log their exchange telemetry
    line = next(m for m in read_metrics(runs / "straight") if "loss/train" in m)
    assert line["ep/exchange_s"] > 0 and line["ep/rank_token_imbalance"] >= 1.0
    assert not any("ep/exchange_s" in m for m in read_metrics(runs / "to_ep1") if m["step"] > 4)  # EP=1 part


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.xdist_group("ep2_checkpoint")
def test_verify_export_and_inference_on_an_ep_checkpoint(ep2_run, tmp_path):
    import torch
    from safetensors.torch import load_file

    from moe.train.checkpoint.loading import load_model_weights
    from moe.tools.inference import load_run

    run = ep2_run  # read only: the copies broken below live in tmp_path
    workdir = run.parent.parent
    step = run / "checkpoints" / "step_00000008"
    ok = run_moe(["ckpt", "verify", str(run)], cwd=workdir)
    assert "OK (step 8" in ok.stdout and "saved at ep_size=2 in 2 shards" in ok.stdout

    out = tmp_path / "model.safetensors"
    run_moe(["ckpt", "export", str(step), str(out)], cwd=workdir)
    exported = load_file(str(out))
    assert exported["blocks.1.ffn.experts.w13"].shape[0] == 4
    weights = load_model_weights(str(run / "checkpoints"))
    for k, v in exported.items():
        assert torch.equal(v, weights[k]), k
    model, _, _ = load_run(str(run))  # what `moe generate` and `moe eval` use
    sd = model.state_dict()
    assert all(torch.equal(sd[k], weights[k]) for k in sd)
    gen = run_moe(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "5"], cwd=workdir)
    assert gen.stdout.startswith("def ")

    # an expert shard removed: its experts are reported missing
    broken = tmp_path / "broken"
    shutil.copytree(step, broken)
    (broken / "experts-ep001-of002.safetensors").unlink()
    bad = run_moe(["ckpt", "verify", str(broken)], cwd=workdir, check=False)
    assert bad.returncode == 1
    for layer in (0, 1):
        for e in (2, 3):
            assert f"missing blocks.{layer}.ffn.experts expert {e} w13" in bad.stderr, bad.stderr
    assert "expert 0" not in bad.stderr and "expert 1 " not in bad.stderr  # experts 0, 1 are still there
    # a shard duplicated under another name: every expert in it is reported twice
    dup = tmp_path / "dup"
    shutil.copytree(step, dup)
    shutil.copy(dup / "experts-ep000-of002.safetensors", dup / "experts-ep000-of002-copy.safetensors")
    bad = run_moe(["ckpt", "verify", str(dup)], cwd=workdir, check=False)
    assert bad.returncode == 1 and "duplicated blocks.0.ffn.experts expert 1 w2" in bad.stderr, bad.stderr
    refused = run_moe(["ckpt", "export", str(dup), str(tmp_path / "x.safetensors")], cwd=workdir, check=False)
    assert refused.returncode != 0 and "duplicated" in refused.stderr and not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused_and_left_untouched(workdir, corpus, data_cache):
    base = common(corpus, data_cache)
    runs = workdir / "runs"
    train(workdir, 1, [*base, "train.steps=4", "run.name=wide"])
    train(workdir, 1, [*base, "train.steps=1", "checkpoint.every=1", "model.moe.expert_hidden=32", "run.name=narrow"])
    shutil.rmtree(runs / "narrow" / "checkpoints")
    shutil.copytree(runs / "wide" / "checkpoints", runs / "narrow" / "checkpoints")
    before = tree_hash(runs / "narrow" / "checkpoints")
    lines = len(read_metrics(runs / "narrow"))
    proc = train(workdir, 1, [*base, "train.steps=6", "checkpoint.every=1", "model.moe.expert_hidden=32",
                              "run.name=narrow"], check=False)
    assert proc.returncode != 0
    err = proc.stderr
    assert "does not fit this model" in err and "blocks.0.ffn.experts" in err and "[128, 64]" in err, err[-3000:]
    assert tree_hash(runs / "narrow" / "checkpoints") == before
    assert len(read_metrics(runs / "narrow")) == lines  # no training step ran


def test_verify_reports_a_folder_that_is_not_a_checkpoint(tmp_path):
    from moe.train.checkpoint.integrity import verify

    assert verify(str(tmp_path))[0].endswith("no meta.json (not a checkpoint written by moe train)")
