"""Balancing losses: hand-computed values, megatron-core references, and which losses are layout
invariant (same value and gradient whether a batch is processed whole or in micro-batches)."""
import pytest
import torch

from moe.routing.losses import (expert_counts, global_load_balancing_loss, load_balancing_loss,
                                sequence_load_balancing_loss, z_loss)
from tests.helpers import router


def test_expert_counts_equal_bincount_and_compile_without_breaks():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 6, (50, 3), generator=g)
    mask = torch.rand(50, 3, generator=g) > 0.3
    torch.testing.assert_close(expert_counts(idx, 8), torch.bincount(idx.reshape(-1), minlength=8))
    torch.testing.assert_close(expert_counts(idx, 8, mask), torch.bincount(idx[mask], minlength=8))
    assert expert_counts(idx[:0], 8).tolist() == [0] * 8
    compiled = torch.compile(expert_counts, fullgraph=True, backend="aot_eager")  # static shape: no graph break
    torch.testing.assert_close(compiled(idx, 8, mask), expert_counts(idx, 8, mask))


def test_sequence_loss_hand_computed():
    # 2 sequences of 2 tokens, 2 experts, top-1
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5],    # seq 0: both pick expert 0 -> f=[1,0], P=[.625,.375]
                          [0.25, 0.75], [0.75, 0.25]])  # seq 1: picks 1 then 0 -> f=[.5,.5], P=[.5,.5]
    idx = torch.tensor([[0], [0], [1], [0]])
    # seq 0: 2 * 0.625 = 1.25; seq 1: 2 * (0.25 + 0.25) = 1.0 -> mean 1.125
    assert float(sequence_load_balancing_loss(probs, idx, 2, num_sequences=2)) == pytest.approx(1.125)
    # one sequence of 4 = the Switch loss of the batch
    torch.testing.assert_close(sequence_load_balancing_loss(probs, idx, 2, 1), load_balancing_loss(probs, idx, 2))


def test_global_loss_hand_computed_and_equals_switch_with_own_load():
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    assert float(global_load_balancing_loss(probs, torch.tensor([0.25, 0.75]), 2)) == pytest.approx(
        2 * (0.25 * 0.625 + 0.75 * 0.375))
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(32, 8), -1)
    idx = probs.topk(2, -1).indices
    own = torch.bincount(idx.reshape(-1), minlength=8).float() / idx.numel()
    torch.testing.assert_close(global_load_balancing_loss(probs, own, 8), load_balancing_loss(probs, idx, 8))
    # uniform f: the loss is constant 1 (no gradient) whatever the probabilities
    assert float(global_load_balancing_loss(probs, torch.full((8,), 1 / 8), 8)) == pytest.approx(1.0)


def test_sequence_loss_equals_megatron_seq_aux_loss():
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

    torch.manual_seed(0)
    B, S, E, k = 3, 16, 8, 2
    probs = torch.softmax(torch.randn(B, S, E), -1)
    idx = probs.topk(k, -1).indices
    ours = 0.01 * sequence_load_balancing_loss(probs.reshape(-1, E), idx.reshape(-1, k), E, B)
    # megatron's _apply_seq_aux_loss: [S, B] token layout, experts of each sequence side by side
    probs_sb = probs.transpose(0, 1).reshape(S, B * E)
    routing_map = torch.zeros(B, S, E).scatter(2, idx, 1.0).transpose(0, 1).reshape(S, B * E)
    ref = switch_load_balancing_loss_func(probs_sb, routing_map.sum(0), S, k, E, 0.01) / B
    torch.testing.assert_close(ours, ref)


def test_global_loss_equals_megatron_global_aux_loss_for_one_micro_batch():
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(64, 8), -1)
    counts = torch.bincount(probs.topk(2, -1).indices.reshape(-1), minlength=8).float()
    ref = switch_load_balancing_loss_func(probs, counts, 64, 2, 8, 1.0)
    torch.testing.assert_close(global_load_balancing_loss(probs, counts / counts.sum(), 8), ref)


def _micro_batch_mean(loss_fn, logits, cuts):
    """Mean of a loss over micro-batches (what DeepSpeed optimises: loss / accumulation steps,
    gradients averaged over ranks), with its gradient w.r.t. the logits."""
    logits = logits.clone().requires_grad_(True)
    parts = torch.split(logits, cuts)
    total = sum(loss_fn(p) for p in parts) / len(parts)
    total.backward()
    return total.detach(), logits.grad


@pytest.mark.parametrize("name,invariant", [("seq", True), ("global", True), ("z", True), ("switch", False)])
def test_layout_invariance(name, invariant):
    """The same global batch of 8 sequences x 16 tokens as 1, 2 or 4 (or 8) equal micro-batches."""
    torch.manual_seed(0)
    B, S, E, k = 8, 16, 4, 2
    logits = torch.randn(B * S, E) * 2
    f_prev = torch.softmax(torch.randn(E), 0)  # the previous step's global load

    def loss(lg):
        probs = torch.softmax(lg, -1)
        idx = probs.topk(k, -1).indices
        return {"seq": lambda: sequence_load_balancing_loss(probs, idx, E, lg.shape[0] // S),
                "global": lambda: global_load_balancing_loss(probs, f_prev, E),
                "z": lambda: z_loss(lg),
                "switch": lambda: load_balancing_loss(probs, idx, E)}[name]()

    whole, grad = _micro_batch_mean(loss, logits, [B * S])
    for n in (2, 4, 8):
        value, g = _micro_batch_mean(loss, logits, [B * S // n] * n)
        if invariant:
            torch.testing.assert_close(value, whole)
            torch.testing.assert_close(g, grad)
        else:
            assert not torch.allclose(value, whole, rtol=1e-4)


def test_router_applies_each_coefficient_and_reports_each_loss():
    torch.manual_seed(0)
    r = router("model.moe.aux_loss_coef=0.5", "model.moe.seq_aux_loss_coef=0.25", "model.moe.global_aux_loss_coef=2",
               "model.moe.z_loss_coef=0.125")
    d = r(torch.randn(32, 4), None, 4)
    idx = d.expert_indices
    torch.testing.assert_close(d.losses["aux_loss"], 0.5 * load_balancing_loss(d.scores, idx, 4))
    torch.testing.assert_close(d.losses["seq_aux_loss"], 0.25 * sequence_load_balancing_loss(d.scores, idx, 4, 4))
    torch.testing.assert_close(d.losses["global_aux_loss"], 2 * global_load_balancing_loss(d.scores, r.global_load, 4))
    torch.testing.assert_close(d.losses["z_loss"], 0.125 * z_loss(d.logits))
    r.eval()
    assert r(torch.randn(32, 4)).losses == {}


def test_sigmoid_losses_use_normalised_scores():
    torch.manual_seed(0)
    r = router("model.moe.score_func=sigmoid", "model.moe.aux_loss_coef=1", "model.moe.seq_aux_loss_coef=1")
    d = r(torch.randn(32, 4), None, 2)
    p = d.scores / d.scores.sum(-1, keepdim=True)
    torch.testing.assert_close(d.losses["aux_loss"], load_balancing_loss(p, d.expert_indices, 4))
    torch.testing.assert_close(d.losses["seq_aux_loss"], sequence_load_balancing_loss(p, d.expert_indices, 4, 2))


def test_layer_passes_sequence_count():
    from tests.helpers import layer

    torch.manual_seed(0)
    m = layer("model.moe.aux_loss_coef=0", "model.moe.seq_aux_loss_coef=1", "model.moe.z_loss_coef=0")
    x = torch.randn(3, 5, 16)
    m(x)
    d = m.router(x.reshape(-1, 16), None, 3)
    torch.testing.assert_close(m.aux_losses["seq_aux_loss"], d.losses["seq_aux_loss"])
    assert not torch.allclose(d.losses["seq_aux_loss"], m.router(x.reshape(-1, 16), None, 1).losses["seq_aux_loss"])
