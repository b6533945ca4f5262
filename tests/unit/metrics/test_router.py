"""moe/metrics/router.py: router_metrics values, per layer, and their reduction over ranks."""
import os

import numpy as np
import pytest
import torch

from moe.metrics.router import router_metrics
from tests.helpers import layer


def _fixed_router(m, logits_row):
    logits = torch.tensor(logits_row)
    m.router.compute_logits = lambda h: logits.expand(h.shape[0], len(logits_row)).clone()


def test_hand_computed_window():
    m = layer("model.moe.top_k=1", "model.moe.capacity_factor=0.5", "model.moe.min_capacity=1",
              "model.moe.aux_loss_coef=0.5", "model.moe.z_loss_coef=0", "model.moe.dispatch=reference")
    _fixed_router(m, [2.0, 0.0, 0.0, 0.0])  # every token -> expert 0
    m(torch.randn(1, 8, 16))  # capacity ceil(0.5 * 8 / 4) = 1: 7 of 8 dropped
    m(torch.randn(1, 8, 16))
    out = router_metrics({3: m})
    p = torch.softmax(torch.tensor([2.0, 0.0, 0.0, 0.0]), 0)
    assert out["router/layer3/load"] == [1.0, 0.0, 0.0, 0.0]
    assert out["router/layer3/tokens_per_expert"] == [16, 0, 0, 0]
    assert out["router/layer3/max_over_mean"] == pytest.approx(4.0)
    assert out["router/layer3/cv"] == pytest.approx(np.sqrt(3))
    assert out["router/layer3/dead_experts"] == 3
    assert out["router/layer3/dropped_frac"] == pytest.approx(14 / 16)
    assert out["router/layer3/dropped_tokens_frac"] == pytest.approx(14 / 16)
    assert out["router/layer3/entropy"] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    assert out["router/layer3/aux_loss"] == pytest.approx(0.5 * 4 * float(p[0]), rel=1e-5)
    assert "router/layer3/bias" not in out
    assert router_metrics({3: m}) == {}  # the window was reset


def test_expert_choice_dropped_is_tokens_without_expert():
    m = layer("model.moe.router=expert_choice", "model.moe.aux_loss_coef=0", "model.moe.capacity_factor=0.5",
              "model.moe.top_k=1", "model.moe.min_capacity=1", "model.moe.dispatch=reference")
    _fixed_router(m, [2.0, 1.0, 0.0, -1.0])  # identical scores: every expert takes the first C=4 tokens
    m(torch.randn(1, 32, 16))
    out = router_metrics({0: m})
    assert out["router/layer0/tokens_per_expert"] == [4, 4, 4, 4]
    assert out["router/layer0/max_over_mean"] == 1.0
    assert out["router/layer0/dropped_frac"] == pytest.approx(28 / 32)
    assert out["router/layer0/dropped_tokens_frac"] == pytest.approx(28 / 32)


def test_bias_stats():
    m = layer("model.moe.bias_update_rate=0.5")
    with torch.no_grad():
        m.router.expert_bias.copy_(torch.tensor([1.0, -1.0, 0.5, 0.5]))
    m(torch.randn(1, 4, 16))
    out = router_metrics({1: m})
    assert out["router/layer1/bias"] == [1.0, -1.0, 0.5, 0.5]
    assert out["router/layer1/bias_range"] == 2.0
    assert out["router/layer1/bias_std"] == pytest.approx(float(torch.tensor([1.0, -1.0, 0.5, 0.5]).std(unbiased=False)))


def _metrics_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    m = layer("model.moe.dispatch=reference")
    x = torch.randn(2, 8, 16)
    m(x[rank:rank + 1])  # each rank one half of the batch
    torch.save(router_metrics({0: m}), os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_metrics_are_reduced_over_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_metrics_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0 == r1
    torch.manual_seed(0)
    m = layer("model.moe.dispatch=reference")
    m(torch.randn(2, 8, 16))  # the whole batch in one process
    whole = router_metrics({0: m})
    assert r0["router/layer0/tokens_per_expert"] == whole["router/layer0/tokens_per_expert"]
    assert r0["router/layer0/entropy"] == pytest.approx(whole["router/layer0/entropy"])
    assert r0["router/layer0/z_loss"] == pytest.approx(whole["router/layer0/z_loss"], rel=1e-5)
