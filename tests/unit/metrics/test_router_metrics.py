"""Router telemetry: router_metrics values and the W&B load heatmap."""
import os

import numpy as np
import pytest
import torch

from moe.metrics import LoadHeatmap, router_metrics
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


def test_heatmap_is_bounded_and_renders():
    h = LoadHeatmap(max_columns=8)
    for step in range(1, 21):
        h.add({"step": step, "router/layer0/load": [0.7, 0.1, 0.1, 0.1], "router/layer2/load": [0.25] * 4,
               "loss/train": 1.0})
        assert len(h) <= 8
    h.add({"step": 21, "loss/val": 2.0})  # lines without loads are ignored
    assert len(h) <= 8 and h.steps[-1] >= 19
    image = h.render()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert LoadHeatmap().render() is None


def test_logger_sends_one_heatmap_image_per_eval_and_no_list_keys(tmp_path, monkeypatch):
    import types

    from moe.config import load_config
    from moe.metrics import MetricLogger

    logged = []

    class FakeRun:
        def define_metric(self, *a, **k):
            pass

        def log(self, data, step):
            logged.append((step, data))

    fake = types.SimpleNamespace(init=lambda **kw: FakeRun(), Image=lambda arr, caption=None: ("image", arr.shape))
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    cfg = load_config("experiments/debug_moe.yaml")
    logger = MetricLogger(str(tmp_path), cfg, {}, None)
    for step in (5, 10):
        logger.log({"step": step, "tokens": step, "loss/train": 1.0, "router/layer0/load": [0.5, 0.5],
                    "router/layer0/cv": 0.0})
    logger.log({"step": 10, "tokens": 10, "loss/val": 1.0})
    assert [("router/load_heatmap" in d) for _, d in logged] == [False, False, True]
    assert all(not isinstance(v, list) for _, d in logged for v in d.values())


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
