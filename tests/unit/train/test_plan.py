"""moe/train/plan.py: the memory terms against DeepSpeed's own estimator and by hand, the verdict and
its advice, throughput, and bad input (one error line before any work)."""
import json

import pytest
import torch
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from moe.cli import main
from moe.config import ConfigError, load_config
from moe.nn.accounting import param_counts
from moe.train.plan import (GB, Layout, estimate, memory_terms, parse_memory, report, startup_line, state_bytes,
                            table_cell, verdict)
from tests.helpers import ROOT, tiny_gpt_config

MODEL = "model.d_model=512 model.n_layers=4 model.n_heads=8 model.vocab_size=32000".split()


def _cfg(*overrides):
    return load_config(None, [*MODEL, *overrides])


def _states(plan):
    return plan.memory["weights"] + plan.memory["gradients"] + plan.memory["optimizer"]


@pytest.mark.parametrize("nodes,per_node", [(1, 8), (2, 8), (8, 4)])
@pytest.mark.parametrize("experts", [0, 8])
def test_zero2_states_equal_deepspeeds_estimator(nodes, per_node, experts):
    """bf16 weights, ZeRO 2 (fp32 master, Adam moments and fp32 gradient partition, bf16 gradient
    partition): DeepSpeed's estimate_zero2_model_states_mem_needs (no offload) assumes exactly that."""
    cfg = _cfg(f"model.moe.num_experts={experts}", "train.zero_stage=2")
    plan = estimate(cfg, Layout(nodes=nodes, gpus_per_node=per_node))
    _, gpu = estimate_zero2_model_states_mem_needs(plan.params_total, per_node, nodes, cpu_offload=False)
    assert abs(_states(plan) - gpu) <= 1


def test_expert_parallel_states_are_deepspeeds_estimate_per_group():
    """ep=4 on 16 GPUs: the experts (1/4 on each rank) are partitioned over their expert-data-parallel
    group of 4, everything else over all 16: the estimator applied to each group."""
    cfg = _cfg("model.moe.num_experts=8", "train.zero_stage=2", "parallel.ep_size=4")
    plan = estimate(cfg, Layout(nodes=2, gpus_per_node=8))
    other = plan.params_total - plan.params_expert
    expected = (estimate_zero2_model_states_mem_needs(other, 8, 2, cpu_offload=False)[1]
                + estimate_zero2_model_states_mem_needs(plan.params_expert // 4, 4, 1, cpu_offload=False)[1])
    assert abs(_states(plan) - expected) <= 2
    assert plan.params_per_rank == other + plan.params_expert // 4


def test_state_bytes_by_stage_by_hand():
    P, n = 1000, 4
    assert state_bytes(P, n, 0, 4) == {"weights": 4 * P, "gradients": 4 * P, "optimizer": 8 * P}  # fp32: m, v
    assert state_bytes(P, n, 0, 2) == {"weights": 2 * P, "gradients": 6 * P, "optimizer": 12 * P}  # + fp32 master
    assert state_bytes(P, n, 1, 2) == {"weights": 2 * P, "gradients": 2 * P + P, "optimizer": 3 * P}
    assert state_bytes(P, n, 2, 2) == {"weights": 2 * P, "gradients": P / 2 + P, "optimizer": 3 * P}
    assert state_bytes(P, n, 1, 4) == {"weights": 4 * P, "gradients": 4 * P + P, "optimizer": 3 * P}


def test_activations_scale_with_the_micro_batch_and_follow_recompute():
    layout = Layout(nodes=1, gpus_per_node=8)
    counts = param_counts(_cfg("model.moe.num_experts=8").model)

    def act(*o):
        return memory_terms(_cfg("model.moe.num_experts=8", *o), counts, layout)[0]["activations"]

    assert act("train.micro_batch_size=8") == pytest.approx(2 * act("train.micro_batch_size=4"))
    assert act("train.recompute=full") < act("train.recompute=moe") < act("train.recompute=none")


def test_the_advice_fits_when_applied():
    """A config too big for 8 x 16 GB: the advised overrides, applied through the config loader and
    planned again, fit."""
    overrides = [*MODEL, "model.d_model=2048", "model.n_heads=16", "model.moe.num_experts=16", "train.seq_len=2048",
                 "model.max_seq_len=2048", "train.micro_batch_size=8"]
    layout = Layout(nodes=1, gpus_per_node=8, memory=16 * GB)
    plan = estimate(load_config(None, overrides), layout)
    assert plan.fits is False and plan.advice and plan.advice[0].startswith("try ")
    advised = plan.advice[0][len("try "):].split(" (total")[0].split()
    again = estimate(load_config(None, overrides + advised), layout)
    assert again.fits is True
    assert "does not fit" in verdict(plan) and plan.largest in verdict(plan)


def test_throughput_and_time_follow_mfu_and_world():
    cfg = _cfg("train.steps=100", "train.micro_batch_size=4", "train.seq_len=256")
    plan = estimate(cfg, Layout(nodes=2, gpus_per_node=8, peak_tflops=1000, mfu=0.5))
    assert plan.tokens == 100 * 4 * 16 * 256
    assert plan.tokens_per_s == pytest.approx(16 * 1000e12 * 0.5 / plan.flops_per_token)
    assert plan.seconds == pytest.approx(plan.tokens / plan.tokens_per_s)


def test_cpu_layout_is_fp32_and_checks_nothing():
    plan = estimate(tiny_gpt_config(), Layout(nodes=1, gpus_per_node=1, device="cpu"))
    assert plan.dtype == "fp32" and plan.fits is None and "host memory" in verdict(plan)
    assert plan.memory["weights"] == 4 * plan.params_total


@pytest.mark.parametrize("text,value", [("80GB", 80e9), ("96GiB", 96 * 2 ** 30), ("141", 141e9), ("512 MB", 512e6)])
def test_parse_memory(text, value):
    assert parse_memory(text) == value


@pytest.mark.parametrize("text", ["80XB", "", "-4GB", "0GB", "GB"])
def test_parse_memory_refuses_nonsense(text):
    with pytest.raises(ConfigError, match="--gpu-memory"):
        parse_memory(text)


@pytest.mark.parametrize("args,message", [
    (["parallel.ep_size=4", "--gpus-per-node", "6"], "parallel.ep_size (4) must divide the world size (6)"),
    (["model.nope=1"], "model.nope"),
    (["--gpu-memory", "eighty"], "--gpu-memory 'eighty'"),
    (["--mfu", "1.5"], "--mfu"),
])
def test_moe_plan_bad_input_is_one_error_line(args, message, capsys, monkeypatch):
    monkeypatch.setattr("moe.train.plan.param_counts", lambda m: pytest.fail("planned after bad input"))
    with pytest.raises(SystemExit) as exit_:
        main(["plan", f"{ROOT}/experiments/debug_moe.yaml", "parallel.ep_size=2", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_moe_plan_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    main(["plan", f"{ROOT}/experiments/debug_moe.yaml", "parallel.ep_size=2", "--nodes", "1", "--gpus-per-node", "2",
          "--json", str(out)])
    text = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert "| weights |" in text and "fits:" in text and "tokens/s" in text
    assert saved["fits"] is True and saved["total"] == pytest.approx(sum(saved["memory"].values()))
    assert saved["params_total"] == param_counts(load_config(f"{ROOT}/experiments/debug_moe.yaml",
                                                             ["model.vocab_size=257"]).model)["params_total"]
    assert "plan debug_moe" in report(estimate(load_config(f"{ROOT}/experiments/debug_moe.yaml"), Layout()),
                                      "debug_moe")


def test_the_lines_train_and_the_readme_print():
    cfg = load_config(f"{ROOT}/experiments/debug_moe.yaml", ["model.vocab_size=257"])
    line = startup_line(cfg, 2, torch.device("cpu"))  # a CPU run: the estimate only, nothing checked
    assert line.startswith("[moe plan] estimated peak") and "host memory" in line and "weights" in line
    fits = estimate(cfg, Layout())
    assert table_cell(fits) == f"fits, {fits.total / 2 ** 30:.1f} GiB"
    small = estimate(cfg, Layout(memory=0.5 * GB), advise=False)
    assert table_cell(small) == f"no: {small.total / 2 ** 30:.1f} GiB, largest {small.largest}"


def test_startup_holds_the_ranks_own_experts_only():
    """The model is built on meta and each rank materialises its own experts (moe/parallel/engine.py): at
    ep=8 a rank holds the shared weights and an eighth of the experts in fp32 at start-up."""
    cfg = _cfg("model.moe.num_experts=64", "model.moe.top_k=8", "model.moe.expert_hidden=256", "parallel.ep_size=8")
    plan = estimate(cfg, Layout(nodes=1, gpus_per_node=8))
    held = plan.params_total - plan.params_expert + plan.params_expert / 8
    assert plan.build_peak == pytest.approx(4 * held + plan.memory["overhead"])
    assert plan.build_peak - plan.memory["overhead"] < 4 * plan.params_total / 2  # far from the whole model
