"""moe/routing/base.py: what the Router base class owns for every family -- fp32 logits, the score
function, the selection bias, the gate normalisation, the balancing losses and per-step load, the
fp32 balancing buffers -- on a minimal subclass; RoutingDecision's fields; `check_unused` and the base
`validate_config`. (The router families' own routing is tested in their files.)"""
import pytest
import torch
import torch.nn.functional as F

from moe.errors import ConfigError
from moe.routing import losses as L
from moe.routing.base import Router, RoutingDecision, _linear, check_unused
from tests.helpers import moe_cfg, router

NO_LOSSES = ("model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0")


class Plain(Router):
    """The smallest token-choice router: top-k of the (biased) selection scores, base gates."""

    def route(self, x, token_ids=None):
        logits = self.compute_logits(x)
        scores = self.score(logits)
        idx = torch.topk(self.selection_scores(scores), self.top_k, dim=-1).indices
        return self.token_choice_decision(idx, self.gates(scores.gather(1, idx)), logits, scores)


def plain(*overrides, d=6, num_experts=4):
    torch.manual_seed(0)
    return Plain(d, moe_cfg(*overrides, num_experts=num_experts))


# ------------------------------------------------------------------------------------ RoutingDecision


def test_a_decision_defaults_to_no_losses_no_mask_token_choice():
    idx = torch.tensor([[0, 1], [1, 3], [3, 3]])
    d = RoutingDecision(idx, torch.ones(3, 2), None, torch.zeros(3, 4), torch.zeros(3, 4))
    assert d.losses == {} and d.slot_mask is None and d.expert_choice is False
    assert d.routed_counts(4).tolist() == [1, 2, 0, 3]
    assert d.routed_counts(4).dtype == torch.int64
    other = RoutingDecision(idx, torch.ones(3, 2), None, torch.zeros(3, 4), torch.zeros(3, 4))
    other.losses["x"] = torch.tensor(1.0)
    assert d.losses == {}  # a fresh dict per decision
    masked = RoutingDecision(idx, torch.ones(3, 2), None, torch.zeros(3, 4), torch.zeros(3, 4),
                             slot_mask=torch.tensor([[True, False], [True, True], [False, True]]))
    assert masked.routed_counts(4).tolist() == [1, 1, 0, 2]  # unused slots are not routed


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_token_choice_priority_follows_the_drop_policy(policy):
    r = plain(f"model.moe.drop_policy={policy}")
    d = r(torch.randn(5, 6))
    assert d.expert_indices.shape == (5, 2) and d.expert_indices.dtype == torch.int64
    if policy == "probs":
        assert d.priority is d.gate_weights
    else:
        assert d.priority is None


def test_the_base_class_routes_nothing_and_accepts_any_config():
    r = Router(6, moe_cfg())
    with pytest.raises(NotImplementedError):
        r(torch.randn(2, 6))
    assert Router.validate_config(moe_cfg("model.moe.jitter_eps=0.5", "model.moe.noisy_gating=true")) is None


# ------------------------------------------------------------------------------- parameters, buffers


def test_parameters_and_buffers_exist_only_for_what_is_configured():
    r = plain()
    assert r.weight.shape == (4, 6) and r.num_experts == 4 and r.top_k == 2
    assert 0.018 < float(plain(d=256, num_experts=64).weight.detach().std()) < 0.022  # normal(0, 0.02)
    assert r.noise_weight is None and r.expert_bias is None and r.global_load is None and r.step_load is None
    assert set(r.state_dict()) == {"weight"}

    noisy = plain("model.moe.noisy_gating=true")
    assert noisy.noise_weight.shape == (4, 6) and not noisy.noise_weight.any()  # zero-initialised
    biased = plain("model.moe.bias_update_rate=0.01")
    assert torch.equal(biased.expert_bias, torch.zeros(4)) and biased.global_load is None
    assert torch.equal(biased.step_load, torch.zeros(4, dtype=torch.long))
    global_ = plain("model.moe.global_aux_loss_coef=0.01")
    assert torch.equal(global_.global_load, torch.full((4,), 0.25)) and global_.expert_bias is None
    assert global_.step_load is not None
    # saved with the model: the balancing state, never the per-step count
    assert set(biased.state_dict()) == {"weight", "expert_bias"}
    assert set(global_.state_dict()) == {"weight", "global_load"}


# ---------------------------------------------------------------------------------- logits, scores


def test_logits_are_fp32_x_times_w_transposed_and_clean_in_eval():
    r = plain("model.moe.noisy_gating=true", "model.moe.jitter_eps=0.5").eval()
    x = torch.randn(7, 6, dtype=torch.bfloat16)
    logits = r.compute_logits(x)
    assert logits.dtype == torch.float32 and logits.shape == (7, 4)
    torch.testing.assert_close(logits, x.float() @ r.weight.t())
    torch.testing.assert_close(r.compute_logits(x), logits, rtol=0, atol=0)  # no noise in eval


def test_noisy_gating_noise_has_softplus_scale_in_training():
    r = plain("model.moe.noisy_gating=true", d=4, num_experts=8).train()
    x = torch.randn(4000, 4)
    clean = x @ r.weight.detach().t()
    noise = (r.compute_logits(x) - clean).detach()
    # W_noise = 0: the noise std is softplus(0) = ln 2 for every (token, expert)
    assert abs(float(noise.std()) - float(F.softplus(torch.tensor(0.0)))) < 0.02
    assert abs(float(noise.mean())) < 0.02


def test_jitter_scales_the_input_within_eps_in_training():
    r = plain("model.moe.jitter_eps=0.1", d=1, num_experts=1).train()
    with torch.no_grad():
        r.weight.fill_(1.0)
    x = torch.full((2000, 1), 2.0)
    logits = r.compute_logits(x).detach()  # = 2 * U(0.9, 1.1)
    assert float(logits.min()) >= 1.8 - 1e-6 and float(logits.max()) <= 2.2 + 1e-6
    assert float(logits.max() - logits.min()) > 0.3  # it does vary


def test_linear_matches_f_linear_in_either_layout():
    x, w = torch.randn(9, 5), torch.randn(3, 5)
    torch.testing.assert_close(_linear(x, w), F.linear(x, w))
    assert _linear(x, w).shape == (9, 3)
    x3 = torch.randn(2, 9, 5)
    torch.testing.assert_close(_linear(x3, w), F.linear(x3, w))


def test_score_functions():
    logits = torch.randn(10, 4)
    soft = plain().score(logits)
    torch.testing.assert_close(soft, torch.softmax(logits, dim=-1))
    torch.testing.assert_close(soft.sum(-1), torch.ones(10))
    torch.testing.assert_close(plain().score(logits.view(2, 5, 4)), torch.softmax(logits.view(2, 5, 4), -1))
    sig = plain("model.moe.score_func=sigmoid").score(logits)
    torch.testing.assert_close(sig, torch.sigmoid(logits))


def test_selection_scores_add_the_bias_only_when_configured():
    scores = torch.rand(3, 4)
    assert plain().selection_scores(scores) is scores
    r = plain("model.moe.bias_update_rate=0.01")
    r.expert_bias.copy_(torch.tensor([0.5, 0.0, -0.5, 0.0]))
    torch.testing.assert_close(r.selection_scores(scores), scores + torch.tensor([0.5, 0.0, -0.5, 0.0]))


@pytest.mark.parametrize("overrides,k,normalised", [
    ((), 2, False),                                                  # softmax top-k: raw probabilities
    (("model.moe.renormalize=true",), 2, True),                      # Mixtral
    (("model.moe.score_func=sigmoid",), 2, True),                    # DeepSeek-V3, k > 1
    (("model.moe.score_func=sigmoid", "model.moe.top_k=1"), 1, False),  # k = 1: the raw score
])
def test_gates(overrides, k, normalised):
    r = plain(*overrides)
    chosen = torch.tensor([[0.6, 0.2], [0.1, 0.1], [0.3, 0.0]])[:, :k]
    gates = r.gates(chosen)
    if normalised:
        torch.testing.assert_close(gates, chosen / chosen.sum(-1, keepdim=True))
    else:
        assert torch.equal(gates, chosen)


def test_normalised_gates_of_all_zero_scores_stay_finite():
    gates = plain("model.moe.renormalize=true").gates(torch.zeros(2, 2))
    assert torch.equal(gates, torch.zeros(2, 2))


def test_balance_probs_sum_to_one_per_token():
    scores = torch.rand(5, 4)
    soft = plain()
    assert soft.balance_probs(scores) is scores  # softmax scores are probabilities already
    sig = plain("model.moe.score_func=sigmoid").balance_probs(scores)
    torch.testing.assert_close(sig, scores / scores.sum(-1, keepdim=True))
    assert torch.isfinite(plain("model.moe.score_func=sigmoid").balance_probs(torch.zeros(1, 4))).all()


# ---------------------------------------------------------------------------------------- balancing


def test_balancing_losses_are_the_coefficient_weighted_losses_of_losses_py():
    r = plain("model.moe.aux_loss_coef=0.5", "model.moe.seq_aux_loss_coef=0.25",
              "model.moe.global_aux_loss_coef=2", "model.moe.z_loss_coef=0.125").train()
    r.global_load.copy_(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    x = torch.randn(12, 6)
    d = r(x, num_sequences=3)
    probs, idx = d.scores, d.expert_indices
    assert set(d.losses) == {"aux_loss", "seq_aux_loss", "global_aux_loss", "z_loss"}
    torch.testing.assert_close(d.losses["aux_loss"], 0.5 * L.load_balancing_loss(probs, idx, 4))
    torch.testing.assert_close(d.losses["seq_aux_loss"], 0.25 * L.sequence_load_balancing_loss(probs, idx, 4, 3))
    torch.testing.assert_close(d.losses["global_aux_loss"],
                               2 * L.global_load_balancing_loss(probs, r.global_load, 4))
    torch.testing.assert_close(d.losses["z_loss"], 0.125 * L.z_loss(d.logits))
    assert d.losses["aux_loss"].requires_grad  # they train the router


def test_sigmoid_balancing_losses_use_the_normalised_scores():
    r = plain("model.moe.score_func=sigmoid", "model.moe.z_loss_coef=0").train()
    d = r(torch.randn(8, 6))
    probs = d.scores / d.scores.sum(-1, keepdim=True)
    assert set(d.losses) == {"aux_loss"}
    torch.testing.assert_close(d.losses["aux_loss"], 0.01 * L.load_balancing_loss(probs, d.expert_indices, 4))


def test_no_losses_in_eval_or_with_every_coefficient_zero():
    assert plain().eval()(torch.randn(4, 6)).losses == {}
    assert plain(*NO_LOSSES).train()(torch.randn(4, 6)).losses == {}


def test_the_step_load_counts_training_routes_only_and_end_step_clears_it():
    r = plain("model.moe.bias_update_rate=0.1", *NO_LOSSES).train()
    d1, d2 = r(torch.randn(5, 6)), r(torch.randn(3, 6))
    expected = d1.routed_counts(4) + d2.routed_counts(4)
    assert torch.equal(r.step_load, expected) and int(r.step_load.sum()) == (5 + 3) * 2
    r.eval()(torch.randn(7, 6))
    assert torch.equal(r.step_load, expected)  # evaluation is not training load
    r.end_step(torch.tensor([6.0, 2.0, 4.0, 4.0]))
    assert torch.equal(r.step_load, torch.zeros(4, dtype=torch.long))


def test_end_step_moves_the_bias_against_the_load_and_records_the_global_fraction():
    r = plain("model.moe.bias_update_rate=0.1", "model.moe.global_aux_loss_coef=0.01")
    r.end_step(torch.tensor([6, 2, 4, 4]))  # mean 4: over, under, even, even
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    torch.testing.assert_close(r.global_load, torch.tensor([0.375, 0.125, 0.25, 0.25]))
    r.end_step(torch.zeros(4))  # a step without tokens leaves the fraction as it was
    torch.testing.assert_close(r.global_load, torch.tensor([0.375, 0.125, 0.25, 0.25]))
    assert r.expert_bias.dtype == torch.float32 and r.global_load.dtype == torch.float32


def test_balancing_buffers_return_to_fp32_when_a_wrapper_casts_them():
    r = plain("model.moe.bias_update_rate=0.001", "model.moe.global_aux_loss_coef=0.01").to(torch.bfloat16)
    assert r.expert_bias.dtype == torch.bfloat16 and r.global_load.dtype == torch.bfloat16
    d = r.train()(torch.randn(4, 6))
    assert r.expert_bias.dtype == torch.float32 and r.global_load.dtype == torch.float32
    assert d.logits.dtype == torch.float32 and d.scores.dtype == torch.float32  # routing in fp32 too
    r.end_step(torch.tensor([3.0, 1.0, 2.0, 2.0]))
    assert float(r.expert_bias[1]) == pytest.approx(0.001)  # a bf16 bias could not hold this step


# ------------------------------------------------------------------------------------- check_unused


def test_check_unused_passes_when_nothing_is_set():
    check_unused(moe_cfg(), "hash", "routes by token id", "noisy_gating", "jitter_eps", "bias_update_rate")


def test_check_unused_names_every_set_key_and_how_to_unset_it():
    cfg = moe_cfg("model.moe.noisy_gating=true", "model.moe.jitter_eps=0.01")
    with pytest.raises(ConfigError) as info:
        check_unused(cfg, "hash", "routes by token id", "noisy_gating", "jitter_eps", "bias_update_rate")
    assert str(info.value) == (
        "model.moe.router=hash routes by token id: model.moe.noisy_gating=True, model.moe.jitter_eps=0.01 "
        "makes no sense with it (set model.moe.noisy_gating=false, model.moe.jitter_eps=0)")


def test_sigmoid_scores_driven_to_zero_cannot_drive_the_balancing_loss_below_one():
    """megatron-core issue #1545: with a 1e-20 floor in the sigmoid normaliser, scores pushed below
    it make the normalised probabilities (and the loss) vanish. Here they still sum to 1 per token."""
    r = router("model.moe.score_func=sigmoid", "model.moe.aux_loss_coef=1.0", "model.moe.z_loss_coef=0",
               num_experts=4)
    r.train()
    with torch.no_grad():
        r.weight.zero_()
    x = torch.zeros(64, 4)
    r.compute_logits = lambda h: torch.full((h.shape[0], 4), -60.0)  # sigmoid(-60) = 8.8e-27 per expert
    d = r(x)
    probs = r.balance_probs(d.scores)
    torch.testing.assert_close(probs.sum(-1), torch.ones(64))
    assert float(d.losses["aux_loss"]) >= 1.0 - 1e-6  # uniform scores: exactly the balanced value, 1
    assert float((d.scores / d.scores.sum(-1, keepdim=True).clamp_min(1e-20)).sum(-1).max()) < 1e-5  # the old floor


@pytest.mark.parametrize("extra", [["model.moe.bias_update_rate=0.01"],
                                   ["model.moe.n_groups=4", "model.moe.topk_groups=1"]], ids=["bias", "groups"])
def test_balancing_counts_the_unbiased_top_k_of_the_scores_like_megatron(extra):
    """With the aux-loss-free bias or group limits, f_e counts the top-k of the scores themselves
    (megatron-core compute_routing_scores_for_aux_loss, DeepSeek-V3), not the biased selection."""
    from megatron.core.transformer.moe.moe_utils import (compute_routing_scores_for_aux_loss,
                                                         switch_load_balancing_loss_func)

    r = router("model.moe.score_func=sigmoid", "model.moe.top_k=2", "model.moe.aux_loss_coef=0.01",
               "model.moe.z_loss_coef=0", *extra, d=8, num_experts=8)
    r.train()
    torch.manual_seed(0)
    if r.expert_bias is not None:
        with torch.no_grad():
            r.expert_bias.copy_(torch.linspace(-1.0, 1.0, 8))  # large: the biased selection differs
    x = torch.randn(128, 8)
    d = r(x)
    logits = r.compute_logits(x)
    routing_map, scores = compute_routing_scores_for_aux_loss(logits, 2, "sigmoid")
    ref = switch_load_balancing_loss_func(scores, routing_map.sum(0), 128, 2, 8, 0.01)
    torch.testing.assert_close(d.losses["aux_loss"], ref)
    biased = torch.zeros(128, 8).scatter(1, d.expert_indices, 1.0)
    assert not torch.equal(biased, routing_map.float())  # the selection itself is the biased one
