import math

import pytest
import torch

from moe.config import load_config
from moe.routing import build_router
from moe.routing.losses import load_balancing_loss, z_loss


def router(*overrides, d=4):
    cfg = load_config(None, ["model.vocab_size=10", "model.moe.num_experts=4", *overrides]).model.moe
    return build_router(d, cfg)


def test_topk_softmax_hand_computed():
    r = router("model.moe.top_k=2", "model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0")
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    d = r(x)
    p = torch.softmax(x, -1)[0]
    assert d.expert_indices.tolist() == [[0, 1]]
    torch.testing.assert_close(d.gate_weights[0], p[:2])


def test_renormalize_makes_weights_sum_to_one():
    r = router("model.moe.top_k=2", "model.moe.renormalize=true")
    d = r(torch.randn(50, 4))
    torch.testing.assert_close(d.gate_weights.sum(-1), torch.ones(50))


def test_topk_picks_k_distinct_experts():
    r = router("model.moe.top_k=3")
    d = r(torch.randn(200, 4))
    assert d.expert_indices.shape == (200, 3)
    assert all(len(set(row)) == 3 for row in d.expert_indices.tolist())


def test_router_runs_in_fp32_for_bf16_inputs():
    r = router()
    d = r(torch.randn(8, 4, dtype=torch.bfloat16))
    assert d.logits.dtype == torch.float32 and d.gate_weights.dtype == torch.float32


def test_aux_loss_hand_computed():
    # 2 tokens, 2 experts, top-1: both pick expert 0 with probs [0.75, 0.25] and [0.5, 0.5]
    scores = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    idx = torch.tensor([[0], [0]])
    # f = [1, 0], P = [0.625, 0.375] -> E * sum(f * P) = 2 * 0.625
    assert float(load_balancing_loss(scores, idx, 2)) == pytest.approx(1.25)


def test_aux_loss_is_one_when_balanced():
    scores = torch.full((4, 4), 0.25)
    idx = torch.tensor([[0], [1], [2], [3]])
    assert float(load_balancing_loss(scores, idx, 4)) == pytest.approx(1.0)


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert float(z_loss(logits)) == pytest.approx(expected)


def test_losses_equal_megatron_reference():
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func, z_loss_func

    torch.manual_seed(0)
    T, E, k = 64, 8, 2
    logits = torch.randn(T, E)
    probs = torch.softmax(logits, -1)
    idx = torch.topk(probs, k, -1).indices
    tokens_per_expert = torch.bincount(idx.reshape(-1), minlength=E)
    ref = switch_load_balancing_loss_func(probs, tokens_per_expert, T, k, E, 0.01)
    ours = 0.01 * load_balancing_loss(probs, idx, E)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(1e-3 * z_loss(logits), z_loss_func(logits, 1e-3))


def test_router_losses_use_coefficients():
    r = router("model.moe.aux_loss_coef=0.5", "model.moe.z_loss_coef=0.25")
    x = torch.randn(32, 4)
    d = r(x)
    torch.testing.assert_close(d.losses["aux_loss"], 0.5 * load_balancing_loss(d.scores, d.expert_indices, 4))
    torch.testing.assert_close(d.losses["z_loss"], 0.25 * z_loss(d.logits))


def test_sigmoid_scores_renormalised():
    r = router("model.moe.score_func=sigmoid", "model.moe.top_k=2")
    d = r(torch.randn(16, 4))
    assert (d.scores > 0).all() and (d.scores < 1).all()
    torch.testing.assert_close(d.gate_weights.sum(-1), torch.ones(16))
