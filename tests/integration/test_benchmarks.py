"""benchmarks/{layer,train,dispatch}.py: tiny end-to-end invocations (the tables and JSON they promise),
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
    stdout, res = _bench("layer", "--tokens", "64", "--reps", "3", "--zero-grad", tmp_path=tmp_path)
    assert res["zero_grad"] is True and res["freed_memory_reused"] is can_keep_freed_memory()
    rows = res["shapes"]["64"]
    assert {"dense", "ours dropless", "ours cf=1.0"} <= set(rows)
    assert ("ours + _grouped_mm" in rows) == hasattr(torch, "_grouped_mm")
    assert rows["dense"]["vs_dense"] == 1.0
    for name, r in rows.items():
        assert r["ms"] > 0 and r["vs_dense_p25"] <= r["vs_dense"] <= r["vs_dense_p75"], name
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
