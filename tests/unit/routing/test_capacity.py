"""Capacity and drop policy, per router: over-full experts keep their highest-priority pairs, dropped
pairs contribute nothing, a token with no kept expert passes through the residual unchanged."""
import pytest
import torch

from moe import ops
from moe.config import load_config
from moe.nn.gpt import Block
from moe.routing.capacity import layer_capacity
from tests.helpers import layer, moe_cfg

ROUTERS = {
    "topk": [],
    "switch": ["model.moe.router=switch", "model.moe.top_k=1"],
    "sinkhorn": ["model.moe.router=sinkhorn", "model.moe.aux_loss_coef=0"],
    "hash": ["model.moe.router=hash", "model.moe.aux_loss_coef=0"],
    "group_limited": ["model.moe.n_groups=2", "model.moe.topk_groups=1"],
    "random_routing": ["model.moe.random_routing=true"],
    "expert_choice": ["model.moe.router=expert_choice", "model.moe.aux_loss_coef=0"],
}


def _run(name, *extra, tokens=32, seed=0):
    torch.manual_seed(seed)
    m = layer(*ROUTERS[name], "model.moe.min_capacity=1", "model.moe.dispatch=reference", *extra)
    x = torch.randn(1, tokens, 16)
    ids = torch.randint(0, 50, (1, tokens))
    torch.manual_seed(seed + 1)
    y = m(x, ids)
    torch.manual_seed(seed + 1)  # same noise / random routing draw
    d = m.router(x[0], ids[0])
    return m, x, y, d


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_capacity_bounds_every_expert_and_dropped_tokens_get_zero(name):
    m, x, y, d = _run(name, "model.moe.capacity_factor=0.5")
    C = m.capacity(32)
    idx = d.expert_indices
    if d.slot_mask is not None:
        idx = torch.where(d.slot_mask, idx, torch.full_like(idx, 4))
    index = ops.build_routing_index(idx, 5 if d.slot_mask is not None else 4, C, d.priority)
    assert (index.tokens_per_expert[:4] <= C).all()
    kept = index.dest_rows >= 0
    if d.slot_mask is not None:
        kept &= d.slot_mask
    none_kept = ~kept.any(1)
    assert none_kept.any(), "capacity 0.5 should leave some token without an expert"
    assert (y[0][none_kept] == 0).all()  # the MoE adds nothing: the residual carries the token
    assert float(m.stats.dropped_tokens) == float(none_kept.sum())
    assert float(m.stats.dropped) > 0


@pytest.mark.parametrize("name", sorted(set(ROUTERS) - {"expert_choice"}))
def test_dropless_drops_nothing(name):
    m, x, y, d = _run(name)
    assert m.capacity(32) is None
    assert float(m.stats.dropped) == 0 and float(m.stats.dropped_tokens) == 0


@pytest.mark.parametrize("name", sorted(set(ROUTERS) - {"expert_choice", "hash"}))
def test_probs_policy_keeps_highest_gates_position_policy_earliest(name):
    for policy in ("probs", "position"):
        m, x, y, d = _run(name, "model.moe.capacity_factor=0.5", f"model.moe.drop_policy={policy}")
        C = m.capacity(32)
        index = ops.build_routing_index(d.expert_indices, 4, C, d.priority)
        kept = index.dest_rows >= 0
        for e in range(4):
            chosen = d.expert_indices == e
            if d.slot_mask is not None:
                chosen &= d.slot_mask
            if int(chosen.sum()) <= C:
                continue
            kept_e = kept & (d.expert_indices == e)
            if policy == "probs":
                lowest_kept = d.gate_weights[kept_e].min()
                highest_dropped = d.gate_weights[(d.expert_indices == e) & ~kept].max()
                assert lowest_kept >= highest_dropped
            else:
                tokens = kept_e.any(1).nonzero().squeeze(1)
                first = (d.expert_indices == e).any(1).nonzero().squeeze(1)[:C]
                assert torch.equal(tokens, first)


def test_random_routing_unused_slots_take_no_capacity():
    torch.manual_seed(0)
    m = layer("model.moe.random_routing=true", "model.moe.renormalize=true", "model.moe.capacity_factor=0.5",
              "model.moe.min_capacity=1", "model.moe.dispatch=reference")
    # every token: 0.9 on expert 0, 0.1 on expert 1 -> its 2nd expert is used with probability 0.2
    logits = torch.log(torch.tensor([0.9, 0.1, 1e-6, 1e-6]))
    m.router.compute_logits = lambda h: logits.expand(h.shape[0], 4).clone()
    m(torch.randn(1, 400, 16))
    s = m.stats
    assert float(s.tokens_per_expert[0]) == 400 and 40 < float(s.tokens_per_expert[1]) < 120
    assert float(s.slots) == float(s.tokens_per_expert.sum())  # unused slots are not routed pairs
    # capacity 100 per expert: expert 0 drops 300, expert 1 keeps all of its ~80 (unused slots took none)
    assert float(s.dropped) == 300


def test_random_routing_output_equals_masked_combination():
    torch.manual_seed(0)
    m = layer("model.moe.random_routing=true", "model.moe.dispatch=reference")
    x = torch.randn(1, 64, 16)
    torch.manual_seed(5)
    y = m(x)
    torch.manual_seed(5)
    d = m.router(x[0])
    ref = layer("model.moe.dispatch=reference")
    ref.load_state_dict(m.state_dict())
    index = ops.build_routing_index(d.expert_indices, 4, None, None)
    out = ref.experts(ops.permute(x[0], index), index.tokens_per_expert)
    expected = ops.unpermute(out, index, d.gate_weights * d.slot_mask)
    torch.testing.assert_close(y[0], expected, rtol=1e-5, atol=1e-6)
    assert not d.slot_mask.all()


def test_fully_dropped_token_passes_through_the_block_unchanged_by_the_ffn():
    torch.manual_seed(0)
    cfg = load_config("experiments/debug_moe.yaml", ["model.vocab_size=50", "model.moe.capacity_factor=0.1",
                                                     "model.moe.min_capacity=1", "model.moe.dispatch=reference"])
    block = Block(cfg.model, 0, is_moe=True)
    x = torch.randn(1, 16, cfg.model.d_model)
    from moe.nn.gpt import rope_tables

    cos, sin = rope_tables(cfg.model.d_model // cfg.model.n_heads, 16, 10000.0)
    y = block(x, cos, sin)
    h = x + block.attn(block.attn_norm(x), cos, sin, 0, None, 0)
    ffn_out = y - h
    dropped = (ffn_out.abs().sum(-1) == 0)[0]
    assert dropped.any()
    torch.testing.assert_close(y[0][dropped], h[0][dropped])


def test_layer_capacity_formula():
    cfg = moe_cfg("model.moe.capacity_factor=1.25", "model.moe.eval_capacity_factor=2.0", "model.moe.top_k=2",
                  "model.moe.min_capacity=4")
    assert layer_capacity(cfg, 100, training=True) == 63  # ceil(1.25 * 100 * 2 / 4)
    assert layer_capacity(cfg, 100, training=False) == 100
    assert layer_capacity(cfg, 4, training=True) == 4  # min_capacity
    dropless = moe_cfg()
    assert layer_capacity(dropless, 100, training=True) is None
    assert layer_capacity(dropless, 100, training=False, capacity_based=False) is None
