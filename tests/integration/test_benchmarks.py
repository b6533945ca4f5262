"""benchmarks/{layer,train,dispatch,prepare}.py: tiny end-to-end invocations (the tables and JSON they promise),
so the benchmarks BENCHMARKS.md quotes keep running. Timings are not checked."""
import json
import os
import subprocess
import sys

import pytest
import torch

from moe import ops
from moe.train.host_memory import can_keep_freed_memory

from tests.helpers import ROOT


def _bench(name, *args, tmp_path):
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args, "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_layer_benchmark_reports_every_implementation_against_dense(tmp_path):
    stdout, res = _bench("layer", "--shape", "4:2:32", "--d-model", "64", "--tokens", "64", "--reps", "3",
                         "--zero-grad", tmp_path=tmp_path)
    assert res["zero_grad"] is True and res["freed_memory_reused"] is can_keep_freed_memory()
    assert res["d_model"] == 64 and list(res["shapes"]) == ["4:2:32"]
    rows = res["shapes"]["4:2:32"]["64"]
    assert {"dense", "ours dropless", "ours cf=1.0"} <= set(rows)
    assert ("ours + _grouped_mm" in rows) == hasattr(torch, "_grouped_mm")
    assert rows["dense"]["vs_dense"] == 1.0
    assert ("dense, our kernels" in rows) == ops.extension_available()
    for name, r in rows.items():
        assert r["ms"] > 0 and r["vs_dense_p25"] <= r["vs_dense"] <= r["vs_dense_p75"], name
        if ops.extension_available():  # every row also against the dense FFN through our own kernels
            assert r["vs_our_dense_p25"] <= r["vs_our_dense"] <= r["vs_our_dense_p75"], name
    if ops.extension_available():
        assert rows["dense, our kernels"]["vs_our_dense"] == 1.0 and "x our dense" in stdout
    assert "ours dropless" in stdout and "p25-p75" in stdout


@pytest.mark.slow
def test_train_benchmark_reports_the_ratio(tmp_path):
    stdout, res = _bench("train", "--steps", "2", "--system-alloc", "train.seq_len=32", "train.micro_batch_size=2",
                         tmp_path=tmp_path)
    assert res["freed_memory_reused"] is False and res["tokens_per_step"] == 64
    assert res["moe"]["tokens_per_s"] > 0 and res["dense"]["tokens_per_s"] > 0
    assert 0 < res["moe_over_dense_p25"] <= res["moe_over_dense_p75"]
    assert "MoE / dense tokens/s" in stdout


@pytest.mark.skipif(not ops.extension_available(), reason="moe._C is not built")
def test_dispatch_benchmark_quick(tmp_path):
    stdout, res = _bench("dispatch", "--quick", "--reps", "1", "--no-megatron", tmp_path=tmp_path)
    assert res["allocator"] == ("freed memory kept for reuse" if can_keep_freed_memory() else "system default")
    ops_seen = {(r["op"], r["impl"]) for shape in res["shapes"] for r in shape["results"]}
    assert ("unpermute bwd", "ours") in ops_seen and ("permute fwd", "reference") in ops_seen


@pytest.mark.slow
@pytest.mark.distributed
def test_memory_benchmark_measures_each_rank_holding_its_own_experts(tmp_path):
    """`moe bench memory` (benchmarks/memory.py): 2 gloo ranks at ep=2 with full recompute, a tiny model;
    each rank built on meta holds the non-expert weights and half of the experts (counted here from
    the shapes), and the table and JSON carry the peak, the expected figure and the step time."""
    d, E, h, layers, vocab = 64, 8, 32, 4, 257
    stdout, res = _bench("memory", "--nproc", "2", "--cases", "ep=2,recompute=full", "--steps", "1", "--warmup", "0",
                         "--micro-batch", "1", f"model.d_model={d}", "model.n_heads=2", f"model.moe.num_experts={E}",
                         f"model.moe.expert_hidden={h}", "train.seq_len=64", tmp_path=tmp_path)
    (row,) = res["rows"]
    non_expert = vocab * d + layers * (4 * d * d + E * d + 2 * d) + d  # tied head; attention, router, norms
    local_experts = layers * (E // 2) * 3 * d * h
    assert [r["params"] for r in row["ranks"]] == [non_expert + local_experts] * 2
    assert row["expected"] > 16 * (non_expert + local_experts) and row["step_s"] > 0 and row["peak"] > 0
    assert "ep=2,recompute=full" in stdout and "expected" in stdout


@pytest.mark.slow
def test_prepare_benchmark_compares_workers_and_datasets(tmp_path):
    stdout, res = _bench("prepare", "--mb", "1", "--shard-mb", "0.25", "--no-kill", tmp_path=tmp_path)
    variants = res["variants"]
    assert set(variants) == {"prepare w1", "prepare w2", "datasets map w2"}
    assert len({v["tokens"] for v in variants.values()}) == 1  # the same tokens counted three ways
    assert all(v["seconds"] > 0 and v["cpu_seconds"] > 0 for v in variants.values())
    assert "| prepare w2 |" in stdout and "load average" in stdout
