import math

import pytest
import torch

from moe.routing.losses import load_balancing_loss, z_loss
from tests.helpers import router


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


def test_sigmoid_top1_gate_is_the_raw_score():
    # renormalising a single sigmoid score would make every gate 1 and cut the router off the LM loss
    r = router("model.moe.score_func=sigmoid", "model.moe.top_k=1")
    d = r(torch.randn(16, 4))
    torch.testing.assert_close(d.gate_weights, d.scores.gather(1, d.expert_indices))


def test_softmax_before_topk_renormalised_equals_mixtral_softmax_after_topk():
    torch.manual_seed(0)
    r = router("model.moe.top_k=2", "model.moe.renormalize=true", d=8)
    x = torch.randn(100, 8)
    d = r(x)
    logits = d.logits
    top_logits, top_idx = torch.topk(logits, 2, dim=-1)  # Mixtral: top-k of the logits, softmax over k
    mixtral = torch.softmax(top_logits, dim=-1)
    assert torch.equal(d.expert_indices, top_idx)
    torch.testing.assert_close(d.gate_weights, mixtral)


@pytest.mark.parametrize("overrides,kwargs", [
    ([], dict(use_pre_softmax=True)),
    (["model.moe.renormalize=true"], dict(use_pre_softmax=False)),  # Mixtral
    (["model.moe.score_func=sigmoid"], dict(score_function="sigmoid")),
    (["model.moe.score_func=sigmoid", "model.moe.bias_update_rate=0.001"], dict(score_function="sigmoid")),
    (["model.moe.score_func=sigmoid", "model.moe.bias_update_rate=0.001", "model.moe.n_groups=4",
      "model.moe.topk_groups=2", "model.moe.top_k=4"], dict(score_function="sigmoid", num_groups=4, group_topk=2)),
    (["model.moe.n_groups=4", "model.moe.topk_groups=2"], dict(use_pre_softmax=True, num_groups=4, group_topk=2)),
    (["model.moe.score_func=sigmoid", "model.moe.top_k=1"], dict(score_function="sigmoid")),
])
def test_routing_equals_megatron_reference(overrides, kwargs):
    """Selection and gate weights equal megatron-core's topk_routing_with_score_function."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    torch.manual_seed(0)
    E = 8
    r = router(*overrides, d=E, num_experts=E)
    if r.expert_bias is not None:
        with torch.no_grad():
            r.expert_bias.copy_(torch.randn(E) * 0.1)
    d = r(torch.randn(64, E))
    ref_probs, ref_map = topk_routing_with_score_function(
        d.logits, r.top_k, expert_bias=r.expert_bias, **kwargs)
    ours_map = torch.zeros_like(ref_map).scatter(1, d.expert_indices, True)
    assert torch.equal(ours_map, ref_map)
    ours_probs = torch.zeros_like(ref_probs).scatter(1, d.expert_indices, d.gate_weights)
    torch.testing.assert_close(ours_probs, ref_probs)


def test_group_limited_hand_computed():
    # 4 experts in 2 groups {0,1} {2,3}; top-2 inside the best 1 group (group score = top-2 sum)
    r = router("model.moe.top_k=2", "model.moe.n_groups=2", "model.moe.topk_groups=1",
               "model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0")
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))
    # expert 3 has the single best score, but group {0,1} has the larger sum of its top-2
    x = torch.log(torch.tensor([[0.31, 0.29, 0.05, 0.35]]))
    d = r(x)
    assert sorted(d.expert_indices[0].tolist()) == [0, 1]
    plain = router("model.moe.top_k=2")
    with torch.no_grad():
        plain.weight.copy_(torch.eye(4))
    assert sorted(plain(x).expert_indices[0].tolist()) == [0, 3]


def test_group_limited_stays_inside_topk_groups():
    torch.manual_seed(0)
    r = router("model.moe.top_k=3", "model.moe.n_groups=4", "model.moe.topk_groups=2", d=16, num_experts=16)
    d = r(torch.randn(300, 16))
    groups = d.expert_indices // 4
    assert all(len(set(g)) <= 2 for g in groups.tolist())
    assert all(len(set(row)) == 3 for row in d.expert_indices.tolist())


def test_noise_and_jitter_only_in_training():
    torch.manual_seed(0)
    for knob in ("model.moe.noisy_gating=true", "model.moe.jitter_eps=0.5"):
        r = router(knob)
        x = torch.randn(64, 4)
        r.eval()
        clean = r(x)
        torch.testing.assert_close(r(x).logits, clean.logits)  # eval: deterministic
        torch.testing.assert_close(clean.logits, torch.nn.functional.linear(x, r.weight))
        r.train()
        a, b = r(x), r(x)
        assert not torch.allclose(a.logits, b.logits)  # training: noisy


def test_noisy_gating_learns_noise_scale():
    torch.manual_seed(0)
    r = router("model.moe.noisy_gating=true")
    assert torch.count_nonzero(r.noise_weight) == 0  # zero init: noise std softplus(0) = log 2
    d = r(torch.randn(64, 4))
    d.gate_weights.sum().backward()
    assert r.noise_weight.grad is not None and r.noise_weight.grad.abs().sum() > 0


def test_jitter_is_multiplicative_and_bounded():
    torch.manual_seed(0)
    r = router("model.moe.jitter_eps=0.1", "model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0")
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))
    x = torch.randn(1000, 4)
    ratio = r(x).logits.detach() / x
    assert float(ratio.min()) >= 0.9 - 1e-6 and float(ratio.max()) <= 1.1 + 1e-6


def test_random_routing_drops_weak_second_expert():
    torch.manual_seed(0)
    r = router("model.moe.random_routing=true", "model.moe.top_k=2", "model.moe.renormalize=true")
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))
    # g2 / (g1 + g2) = 0.1 -> the second expert is kept with probability 0.2
    weak = torch.log(torch.tensor([0.9, 0.1, 1e-6, 1e-6])).expand(20000, 4)
    d = r(weak)
    assert d.slot_mask[:, 0].all()
    assert abs(float(d.slot_mask[:, 1].float().mean()) - 0.2) < 0.02
    # equal weights: always kept (2 * 0.5 >= 1)
    even = torch.log(torch.tensor([0.5, 0.5, 1e-6, 1e-6])).expand(100, 4)
    assert r(even).slot_mask.all()
    r.eval()
    assert r(weak).slot_mask is None  # training only
