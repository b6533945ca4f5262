"""Expert parallelism is the same model: EP=N against EP=1 (gloo on CPU, processes via torchrun).

The parity runs go through `moe parity`, which launches each layout and compares per step the loss,
the auxiliary and z losses, the gradient norm and the per-expert token counts; with --dump it keeps
the first step's logits and gradients and the final weights, which are compared here tensor by
tensor. All layouts share one global batch of 4 sequences: 1 process accumulates 4 micro-batches,
2 processes 2, 4 processes 1, so gradient accumulation is covered too.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import BALANCING, ROOT, TOL, assert_close, run_moe

DEBUG_MOE = os.path.join(ROOT, "experiments", "debug_moe.yaml")
STEPS = 3  # optimizer steps per parity run: enough for a wrong gradient or exchange to show in the weights


def common(corpus, data_cache):
    return [f"data.dataset={corpus}", f"data.cache_dir={data_cache}", "train.micro_batch_size=1",
            "train.global_batch_size=4", *BALANCING]


def parity(workdir, corpus, data_cache, layouts, steps, keep=None, env=None, extra=()):
    args = ["parity", "experiments/debug_moe.yaml", *common(corpus, data_cache), *extra,
            "--layouts", *layouts, "--steps", str(steps), "--tolerance", str(TOL)]
    if keep:
        args += ["--keep", str(keep), "--dump"]
    return run_moe(args, cwd=workdir, env_extra=env, check=False, timeout=900)


def load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
@pytest.mark.distributed
def test_ep_equals_ep1_outputs_gradients_and_loss_curve(workdir, corpus, data_cache, tmp_path):
    keep = tmp_path / "parity"
    # (ep=2 over 4 ranks, experts also data-parallel, is test_ep_with_zero_1_and_2's layout 2, with ZeRO 2)
    layouts = ["ep=1,nproc=1", "ep=2,nproc=2", "ep=4,nproc=4"]
    proc = parity(workdir, corpus, data_cache, layouts, steps=STEPS, keep=keep)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "OK: 3 layouts agree" in proc.stdout
    ref = keep / "layout0"
    for i in range(1, len(layouts)):
        other = keep / f"layout{i}"
        assert_close(load(other / "logits.safetensors"), load(ref / "logits.safetensors"), f"{layouts[i]} logits")
        grads = load(other / "grads.safetensors")
        assert grads["blocks.0.ffn.experts.w13"].shape[0] == 4  # gathered from the EP ranks
        assert_close(grads, load(ref / "grads.safetensors"), f"{layouts[i]} gradients")
        assert_close(load(other / "weights.safetensors"), load(ref / "weights.safetensors"), f"{layouts[i]} weights")
        # the norm that is logged and clipped counts every expert once: it equals the norm of the
        # gathered full gradient
        norms = json.loads((other / "grad_norm.json").read_text())
        assert abs(norms["grad_norm"] - norms["from_gathered_grads"]) <= TOL * norms["from_gathered_grads"]
    records = [json.loads((keep / f"layout{i}.json").read_text()) for i in range(len(layouts))]
    assert [r["meta"]["grad_accum"] for r in records] == [4, 2, 1]
    assert all(len(r["steps"]) == STEPS for r in records)
    assert all(s["seq_aux_loss"] > 0 and s["global_aux_loss"] > 0 and s["z_loss"] > 0 for s in records[1]["steps"])


@pytest.mark.slow
@pytest.mark.distributed
def test_ep_with_zero_1_and_2(workdir, corpus, data_cache, tmp_path):
    """ZeRO 1 and 2 under expert parallelism, one layout also torch.compile-d (train.compile: the
    exchange runs eagerly between compiled parts), two with activation recompute (train.recompute:
    compiled blocks recomputed whole; the expert region, exchange included, recomputed under ZeRO 2),
    all equal to eager EP=1 without ZeRO or recompute (losses, aux and z losses, grad norm, token counts
    per step: statistics counted once); the model has grouped-query attention, per-head QK-norm and a
    head width independent of d_model."""
    keep = tmp_path / "parity"
    # (ep=4 without ZeRO is test_ep_equals_ep1_outputs_gradients_and_loss_curve's; ZeRO 1 under EP is layout 1 here)
    layouts = ["ep=1,nproc=1", "ep=2,nproc=2,zero=1,compile=true,train.recompute=full",
               "ep=2,nproc=4,zero=2,train.recompute=moe"]
    gqa = ("model.n_kv_heads=1", "model.head_dim=16", "model.qk_norm=head")
    upcycled = _upcycle_from_dense(tmp_path / "dense_hf", gqa)  # a dense Qwen3 folder made into 4 experts of h/2
    proc = parity(workdir, corpus, data_cache, layouts, steps=STEPS, keep=keep, extra=gqa + upcycled)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ref = load(keep / "layout0" / "weights.safetensors")
    for i in range(1, len(layouts)):
        assert_close(load(keep / f"layout{i}" / "weights.safetensors"), ref, f"{layouts[i]} weights after {STEPS} steps")
    _check_export(keep / "layout2" / "weights.safetensors", gqa + upcycled, tmp_path / "exported")


@pytest.mark.slow
@pytest.mark.distributed
def test_parity_harness_catches_a_wrong_expert_gradient_scale(workdir, corpus, data_cache):
    """MOE_TEST_EXPERT_GRAD_SCALE=2 scales the expert gradients under EP (the bug of averaging them over
    the expert-data-parallel group instead of the whole data-parallel world, for ep=2)."""
    bad = parity(workdir, corpus, data_cache, ["ep=1", "ep=2"], steps=2, env={"MOE_TEST_EXPERT_GRAD_SCALE": "2"},
                 extra=["--nproc", "2"])
    assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-3000:]
    assert "grad_norm" in bad.stderr and "FAIL" in bad.stderr


def test_parity_rejects_a_bad_layout_before_launching(workdir, corpus, data_cache):
    proc = parity(workdir, corpus, data_cache, ["ep=1", "ep=3"], steps=1, extra=["--nproc", "4"])
    assert proc.returncode == 2
    assert "ep=3" in proc.stderr and "parallel.ep_size (3) must divide model.moe.num_experts (4)" in proc.stderr
    assert "[parity]" not in proc.stdout  # nothing was launched


# ------------------------------------------------------------------------------------- bad input


def test_ep_size_must_divide_experts_and_world(workdir, data_cache):
    from moe.config import ConfigError, load_config
    from moe.validate import validate

    proc = run_moe(["train", "experiments/debug_moe.yaml", f"data.cache_dir={data_cache}", "parallel.ep_size=3"],
                   cwd=workdir, check=False)
    assert proc.returncode != 0 and "parallel.ep_size (3) must divide model.moe.num_experts (4)" in proc.stderr
    assert not (workdir / "runs").exists()
    with pytest.raises(ConfigError, match=r"parallel.ep_size \(2\) must divide the world size \(1\)"):
        validate(load_config(DEBUG_MOE, ["parallel.ep_size=2"]), world_size=1)


def test_ep_config_checks():
    from moe.config import ConfigError, load_config
    from moe.validate import validate
    from moe.routing import ROUTERS, TopKRouter

    dense = load_config(os.path.join(ROOT, "experiments", "debug_dense.yaml"), ["parallel.ep_size=2"])
    with pytest.raises(ConfigError, match="parallel.ep_size=2 needs MoE layers"):
        validate(dense, world_size=2)
    with pytest.raises(ConfigError, match="parallel.timeout_s"):
        validate(load_config(DEBUG_MOE, ["parallel.timeout_s=0"]), world_size=1)

    class GlobalRouter(TopKRouter):  # a router that would need the tokens of every rank
        supports_expert_parallel = False
        expert_parallel_reason = "it selects over the whole global batch"

    ROUTERS["global_test"] = GlobalRouter
    try:
        cfg = load_config(DEBUG_MOE, ["model.moe.router=global_test", "parallel.ep_size=2"])
        with pytest.raises(ConfigError, match="router=global_test cannot run expert-parallel.*whole global batch"):
            validate(cfg, world_size=2)
        validate(load_config(DEBUG_MOE, ["model.moe.router=global_test"]), world_size=2)
    finally:
        del ROUTERS["global_test"]


# -------------------------------------------------------------------------------- dead / stuck rank


def _launch_two(workdir, corpus, data_cache, fault, timeout_s):
    """Two ranks started by hand (no torchrun, which would tear the survivor down itself), so the
    survivor's own exit is observed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", WANDB_MODE="disabled", MOE_TEST_FAULT=fault,
                   PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "moe.cli", "train", "experiments/debug_moe.yaml", f"data.dataset={corpus}",
             f"data.cache_dir={data_cache}", "parallel.ep_size=2", f"parallel.timeout_s={timeout_s}",
             "train.steps=20", "train.eval_every=0", "checkpoint.save_final=false", f"run.name=fault-{fault[:4]}"],
            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_dead_or_stuck_rank_ends_the_job_with_a_named_collective(workdir, corpus, data_cache, mode):
    timeout_s = 20
    procs = _launch_two(workdir, corpus, data_cache, f"{mode}:1:5", timeout_s)  # rank 1 at its 5th exchange
    try:
        t0 = time.time()
        out, _ = procs[0].communicate(timeout=timeout_s + 120)
        wall = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.communicate()
    assert procs[0].returncode not in (0, None), out[-3000:]
    assert "CollectiveError: rank 0 (EP group ranks [0, 1]): all_to_all_single of the" in out, out[-3000:]
    waited = float(out.split("failed after ")[1].split("s ")[0])
    if mode == "hang":
        assert timeout_s - 1 <= waited <= timeout_s + 10, waited
    else:
        assert waited < timeout_s, waited
    assert wall < timeout_s + 90


def test_a_failed_collective_is_named_with_its_caller():
    """What `moe train` reports when a collective outside the token exchange fails (e.g. DeepSpeed's
    gradient all-reduce)."""
    from moe.parallel import collective_failure

    ns = {}
    exec(compile("def all_reduce():\n    raise RuntimeError('Timed out waiting 20000ms for recv operation')\n",
                 "/venv/torch/distributed/distributed_c10d.py", "exec"), ns)
    exec(compile("def allreduce_bucket(f):\n    f()\n", "/venv/deepspeed/runtime/engine.py", "exec"), ns)
    try:
        ns["allreduce_bucket"](ns["all_reduce"])
    except RuntimeError as exc:
        msg = collective_failure(exc, 1, 4, 20)
    assert msg.startswith("rank 1 of 4: collective all_reduce called from deepspeed/runtime/engine.py:allreduce_bucket")
    assert "parallel.timeout_s=20" in msg and "Timed out waiting 20000ms" in msg
    assert collective_failure(ValueError("not distributed"), 0, 1, 20) is None


def _upcycle_from_dense(folder, gqa):
    """A dense Qwen3 folder of debug_dense's shape (transformers' names, random weights) and the
    overrides that upcycle it into debug_moe's 4 experts of half the dense hidden size (granular)."""
    import torch

    from moe.config import load_config
    from moe.nn.gpt import GPT
    from moe.tools.hf_export import hf_model

    cfg = load_config(os.path.join(ROOT, "experiments", "debug_dense.yaml"), ["model.vocab_size=257", *gqa])
    torch.manual_seed(0)
    hf_model(cfg.model, GPT(cfg.model).state_dict()).save_pretrained(str(folder))
    return (f"model.init_from={folder}", "model.upcycle=granular", "model.moe.renormalize=true")


def _check_export(weights, overrides, out):
    """The model trained at ep=2 + ZeRO-2, exported (Qwen3-MoE) and loaded by transformers'
    from_pretrained: its logits equal ours within 1e-4 and greedy decoding (ours with the KV cache)
    gives the same tokens."""
    import torch
    import transformers

    from moe.config import load_config
    from moe.nn.gpt import GPT
    from moe.tools.hf_export import hf_model
    from moe.tools.inference import generate

    cfg = load_config(DEBUG_MOE, ["model.vocab_size=257", "model.moe.dispatch=reference", *overrides])
    ours = GPT(cfg.model).eval()
    missing, unexpected = ours.load_state_dict(load(weights), strict=False)
    assert set(missing) <= {"head.weight"} and not unexpected, (missing, unexpected)
    hf_model(cfg.model, ours.state_dict()).save_pretrained(str(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    x = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits, rtol=1e-4, atol=1e-4)
        prompt = x[0, :8].tolist()
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 8:]
    assert generate(ours, prompt, 12, temperature=0.0) == theirs.tolist()
