import torch

from moe.routing.sinkhorn import sinkhorn
from tests.helpers import router

SK = ("model.moe.router=sinkhorn", "model.moe.aux_loss_coef=0")


def test_output_close_to_doubly_stochastic():
    torch.manual_seed(0)
    T, E = 256, 8
    p = sinkhorn(torch.randn(T, E) * 2, iters=10)
    torch.testing.assert_close(p.sum(0) * E, torch.ones(E), rtol=1e-5, atol=1e-5)  # exact after a column step
    torch.testing.assert_close(p.sum(1) * T, torch.ones(T), rtol=2e-2, atol=2e-2)
    assert (p >= 0).all()


def test_equals_megatron_sinkhorn():
    from megatron.core.transformer.moe.moe_utils import sinkhorn as megatron_sinkhorn

    torch.manual_seed(0)
    logits = torch.randn(64, 8, dtype=torch.float64)
    ref = megatron_sinkhorn(logits.clone(), tol=1e-7)  # its eps keeps it from going much lower
    torch.testing.assert_close(sinkhorn(logits, iters=500).double(), ref, rtol=1e-5, atol=1e-9)


def test_hand_computed_two_by_two():
    # exp(logits) = [[4, 1], [1, 1]] -> balanced: both tokens would pick expert 0 by score, the
    # Sinkhorn plan sends token 1 to expert 1
    logits = torch.log(torch.tensor([[4.0, 1.0], [1.0, 1.0]]))
    p = sinkhorn(logits, iters=200)
    # closed form: p = [[a, b], [b, a]] / ..., with a/b = 2 (sqrt of the cross ratio 4)
    torch.testing.assert_close(p / p.sum(), torch.tensor([[2.0, 1.0], [1.0, 2.0]]) / 6, rtol=1e-4, atol=1e-6)
    assert p.argmax(1).tolist() == [0, 1]


def test_selection_is_balanced_gates_from_unbalanced_scores():
    torch.manual_seed(0)
    r = router(*SK, "model.moe.top_k=1", "model.moe.z_loss_coef=0", d=4)
    x = torch.randn(400, 4) + torch.tensor([3.0, 0, 0, 0])  # everyone prefers expert 0
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))
    d = r(x)
    counts = torch.bincount(d.expert_indices.reshape(-1), minlength=4)
    assert int(counts.max()) < 2 * 400 / 4  # balanced although plain top-1 sends ~all to expert 0
    assert int(torch.bincount(d.scores.argmax(-1), minlength=4)[0]) > 300
    torch.testing.assert_close(d.gate_weights, d.scores.gather(1, d.expert_indices))
    r.eval()  # eval: greedy top-k of the scores
    assert torch.equal(r(x).expert_indices[:, 0], d.scores.argmax(-1))


def test_topk_distinct():
    torch.manual_seed(0)
    d = router(*SK, "model.moe.top_k=3")(torch.randn(100, 4))
    assert all(len(set(row)) == 3 for row in d.expert_indices.tolist())


def test_near_identical_tokens_round_to_the_same_experts():
    """The documented limit: balance holds for the fractional plan, not for per-token rounding of
    near-duplicate tokens."""
    torch.manual_seed(0)
    T, E = 1024, 8
    logits = torch.randn(T, E) * 0.1
    distinct = torch.bincount(sinkhorn(logits, 10).topk(2, -1).indices.reshape(-1), minlength=E).float()
    logits[:400] = logits[0] + torch.randn(400, E) * 1e-3
    dup = torch.bincount(sinkhorn(logits, 10).topk(2, -1).indices.reshape(-1), minlength=E).float()
    assert float(distinct.max() / distinct.mean()) < 1.1
    assert float(dup.max() / dup.mean()) > 1.5
