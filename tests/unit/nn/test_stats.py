import pytest
import torch

from moe import ops
from moe.nn.stats import RouterStats
from tests.helpers import router


def _routed(*overrides, T=12, seed=0):
    """A training-mode top-2 router's decision for T tokens (d=4, 4 experts)."""
    torch.manual_seed(seed)
    return router(*overrides).train()(torch.randn(T, 4), None, 1)


def test_nothing_before_the_first_update():
    stats = RouterStats(4)
    assert stats.packed is None and stats.tokens_per_expert is None and stats.dropped is None
    assert stats.losses == {}
    with pytest.raises(AttributeError):
        _ = stats.no_such_statistic


def test_dropless_update_counts_every_pair_and_accumulates():
    decision = _routed()
    index = ops.build_routing_index(decision.expert_indices, 4, None, None)
    stats = RouterStats(4)
    stats.update(decision, index, 12, dropless=True)
    torch.testing.assert_close(stats.tokens_per_expert, ops.expert_counts(decision.expert_indices, 4).double())
    assert stats.slots == 24 and stats.dropped == 0 and stats.dropped_tokens == 0
    assert stats.tokens == 12 and stats.calls == 1
    p = decision.scores / decision.scores.sum(-1, keepdim=True)
    torch.testing.assert_close(stats.entropy_sum, torch.special.entr(p).sum().double())
    lse2 = torch.logsumexp(decision.logits.float(), dim=-1).square().sum().double()
    torch.testing.assert_close(stats.lse2_sum, lse2)
    assert set(stats.losses) == set(decision.losses) and stats.loss_names == tuple(sorted(decision.losses))
    first = stats.packed.clone()
    stats.update(decision, index, 12, dropless=True)
    torch.testing.assert_close(stats.packed, 2 * first)  # one vector, summed
    assert stats.calls == 2 and stats.tokens == 24
    stats.reset()
    assert stats.packed is None and stats.loss_names == ()


def test_capacity_update_counts_routed_pairs_and_drops():
    decision = _routed(T=16)
    index = ops.build_routing_index(decision.expert_indices, 4, 3, decision.priority)  # at most 12 of 32 pairs kept
    stats = RouterStats(4)
    assert index.num_dropped > 0
    stats.update(decision, index, 16, dropless=False)
    # before drops: what the router chose
    torch.testing.assert_close(stats.tokens_per_expert, decision.routed_counts(4).double())
    assert stats.slots == 32 and stats.dropped == index.num_dropped == 32 - index.num_rows
    kept = index.dest_rows >= 0
    assert stats.dropped_tokens == int((~kept.any(dim=1)).sum())


def test_router_losses_must_not_change_between_updates():
    decision = _routed()
    index = ops.build_routing_index(decision.expert_indices, 4, None, None)
    stats = RouterStats(4)
    stats.update(decision, index, 12, dropless=True)
    decision.losses = {"other_loss": torch.tensor(1.0)}
    with pytest.raises(RuntimeError, match="router losses changed"):
        stats.update(decision, index, 12, dropless=True)


@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_routing_entropy_against_entr(scale, score_func):
    """With softmax scores the entropy comes from the logits (lse - sum p l); it equals
    torch.special.entr of the normalised scores, for flat, typical and near one-hot routers."""
    decision = _routed(f"model.moe.score_func={score_func}", T=512)
    assert decision.softmax_scores == (score_func == "softmax")
    decision.logits = decision.logits * scale
    decision.logsumexp = None  # the z-loss's, of the logits before scaling
    decision.scores = decision.logits.softmax(-1) if score_func == "softmax" else decision.logits.sigmoid()
    stats = RouterStats(4)
    stats.update(decision, ops.build_routing_index(decision.expert_indices, 4, None, None), 512, dropless=True)
    p = decision.scores.double() / decision.scores.double().sum(-1, keepdim=True)
    torch.testing.assert_close(stats.entropy_sum, torch.special.entr(p).sum(), rtol=1e-5, atol=1e-3)


def test_statistics_reuse_the_z_loss_logsumexp():
    """With the z-loss on, the router hands its logsumexp to the statistics (no second pass over the
    logits): the logged entropy and lse^2 equal those computed from the logits."""
    decision = _routed("model.moe.z_loss_coef=0.001", T=512)
    assert decision.logsumexp is not None and not decision.logsumexp.requires_grad
    index = ops.build_routing_index(decision.expert_indices, 4, None, None)
    reused = RouterStats(4)
    reused.update(decision, index, 512, dropless=True)
    decision.logsumexp = None
    computed = RouterStats(4)
    computed.update(decision, index, 512, dropless=True)
    assert torch.equal(reused.packed, computed.packed)
