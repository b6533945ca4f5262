import pytest
import torch

from moe import ops
from tests.helpers import layer, router

EC = ("model.moe.router=expert_choice", "model.moe.capacity_factor=1.0", "model.moe.aux_loss_coef=0",
      "model.moe.min_capacity=1")


def test_hand_computed_selection():
    # 4 tokens, 2 experts, top_k=1, capacity factor 1 -> C = 4 * 1 / 2 = 2 tokens per expert
    r = router(*EC, "model.moe.top_k=1", "model.moe.z_loss_coef=0", d=2, num_experts=2)
    with torch.no_grad():
        r.weight.copy_(torch.eye(2))
    x = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.0]])
    d = r(x)
    assert d.expert_choice and d.expert_indices.tolist() == [[0, 1]] * 4
    index = ops.build_routing_index(d.expert_indices, 2, 2, d.priority)
    kept = (index.dest_rows >= 0).tolist()
    # expert 0 scores: p0 = softmax -> tokens 0 and 1 highest; expert 1: tokens 2 and 3 (p1 of token 3
    # = sigmoid(-0.5) = 0.38 > token 1's sigmoid(-1) = 0.27)
    assert kept == [[True, False], [True, False], [False, True], [False, True]]


@pytest.mark.parametrize("backend", ["reference", "extension"])
@pytest.mark.parametrize("factor,top_k", [(1.0, 2), (0.5, 1), (2.0, 2)])
def test_each_expert_gets_exactly_capacity_tokens(backend, factor, top_k):
    if backend == "extension" and not ops.extension_available():
        pytest.skip("compiled dispatch extension not built")
    torch.manual_seed(0)
    m = layer(*EC, f"model.moe.capacity_factor={factor}", f"model.moe.top_k={top_k}", "model.moe.min_capacity=0",
              f"model.moe.dispatch={backend}")
    x = torch.randn(2, 24, 16)
    decision = m.router(x.reshape(-1, 16))
    C = m.capacity(48)
    assert C == int(torch.tensor(factor * 48 * top_k / 4).ceil())
    index = ops.build_routing_index(decision.expert_indices, 4, C, decision.priority, backend=backend)
    assert index.tokens_per_expert.tolist() == [C] * 4
    # the kept tokens of each expert are its C highest-scoring ones
    for e in range(4):
        kept = (index.dest_rows[:, e] >= 0).nonzero().squeeze(1)
        top = torch.topk(decision.scores[:, e], C).indices
        assert set(kept.tolist()) == set(top.tolist())
    m(x)  # the whole layer runs
    per_token = (index.dest_rows >= 0).sum(1)
    assert int(per_token.min()) >= 0 and int(per_token.max()) <= 4 and int(per_token.sum()) == 4 * C


def test_output_is_score_weighted_sum_of_choosing_experts_and_unchosen_tokens_get_zero():
    torch.manual_seed(0)
    m = layer(*EC, "model.moe.capacity_factor=0.25", "model.moe.top_k=1", "model.moe.min_capacity=0",
              "model.moe.dispatch=reference")
    x = torch.randn(1, 32, 16)
    y = m(x)[0]
    d = m.router(x[0])
    C = m.capacity(32)
    index = ops.build_routing_index(d.expert_indices, 4, C, d.priority)
    kept = index.dest_rows >= 0
    expected = torch.zeros(32, 16)
    from moe.nn.ffn import swiglu
    for t in range(32):
        for e in range(4):
            if kept[t, e]:
                h = swiglu(x[0, t] @ m.experts.w13[e].T) @ m.experts.w2[e].T
                expected[t] += d.scores[t, e] * h
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-6)
    unchosen = ~kept.any(1)
    assert unchosen.any()  # C = 2 per expert for 32 tokens: most tokens get no expert
    assert (y[unchosen] == 0).all()  # they pass through the residual path
    assert float(m.stats.dropped_tokens) == float(unchosen.sum())


def test_eval_keeps_the_training_capacity():
    m = layer(*EC, "model.moe.capacity_factor=1.0", "model.moe.eval_capacity_factor=0")
    m.eval()
    assert m.capacity(100) == 50  # not dropless: expert choice selects by capacity


def test_stats_load_is_kept_tokens():
    torch.manual_seed(0)
    m = layer(*EC)
    m(torch.randn(2, 8, 16))
    assert m.stats.tokens_per_expert.tolist() == [8.0] * 4  # C = 1.0 * 16 * 2 / 4
