"""The pure-PyTorch reference of the dispatch ops (moe/ops/reference.py), on hand-checked routings.
The compiled ops are compared against it in test_extension.py."""
import pytest
import torch

from moe.ops.reference import (RoutingIndex, build_routing_index_reference, expert_counts, permute_reference,
                               unpermute_reference)
from tests.helpers import DEVICE

cpu_only = pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU-only machinery")
EXPERTS = torch.tensor([[0, 1], [0, 2], [1, 0]])  # 3 tokens, top-2 of 3 experts


def _assert_index(index: RoutingIndex, tokens_per_expert, dest_rows, source_tokens):
    assert index.tokens_per_expert.tolist() == tokens_per_expert
    assert index.dest_rows.tolist() == dest_rows
    assert index.source_tokens.tolist() == source_tokens
    assert index.num_rows == len(source_tokens) and index.num_dropped == 6 - len(source_tokens)
    assert index.tokens_per_expert.dtype == index.dest_rows.dtype == index.source_tokens.dtype == torch.long


@cpu_only
def test_reference_routing_index_rejects_bad_experts():
    for bad in (4, -1):
        for cap in (1, None):
            with pytest.raises(RuntimeError, match=f"expert index {bad} outside"):
                build_routing_index_reference(torch.tensor([[0, bad]]), 4, cap)


def test_dropless_index_sorts_by_expert_then_token():
    # expert 0: (t0, s0), (t1, s0), (t2, s1) -> rows 0-2; expert 1: (t0, s1), (t2, s0) -> 3-4; expert 2: (t1, s1) -> 5
    _assert_index(build_routing_index_reference(EXPERTS, 3), [3, 2, 1], [[0, 3], [1, 5], [4, 2]], [0, 1, 2, 0, 2, 1])


def test_capacity_keeps_the_earliest_tokens_without_priority():
    # capacity 2: expert 0 keeps tokens 0 and 1 and drops (t2, s1)
    _assert_index(build_routing_index_reference(EXPERTS, 3, 2), [2, 2, 1], [[0, 2], [1, 4], [3, -1]], [0, 1, 0, 2, 1])


def test_capacity_keeps_the_highest_priority_in_token_order():
    # expert 0's candidates: t0 (0.1), t1 (0.2), t2 (0.9): it keeps t1 and t2, rows still in token order
    priority = torch.tensor([[0.1, 0.5], [0.2, 0.5], [0.5, 0.9]])
    index = build_routing_index_reference(EXPERTS, 3, 2, priority)
    _assert_index(index, [2, 2, 1], [[-1, 2], [0, 4], [3, 1]], [1, 2, 0, 2, 1])
    # ties (and equal priority everywhere) go to the earliest token, as without a priority
    tied = build_routing_index_reference(EXPERTS, 3, 2, torch.ones(3, 2))
    _assert_index(tied, [2, 2, 1], [[0, 2], [1, 4], [3, -1]], [0, 1, 0, 2, 1])


def test_capacity_zero_drops_everything():
    index = build_routing_index_reference(EXPERTS, 3, 0)
    _assert_index(index, [0, 0, 0], [[-1, -1]] * 3, [])


def test_permute_gathers_rows_and_unpermute_combines_with_the_gate_weights():
    index = build_routing_index_reference(EXPERTS, 3, 2)  # (t2, s1) dropped
    x = torch.arange(3.0).unsqueeze(1) * torch.ones(3, 2)  # token t's row is [t, t]
    permuted = permute_reference(x, index)
    assert permuted[:, 0].tolist() == [0.0, 1.0, 0.0, 2.0, 1.0]
    y = torch.arange(5.0).unsqueeze(1).repeat(1, 2)  # expert output row r is [r, r]
    w = torch.tensor([[0.5, 0.25], [1.0, 2.0], [3.0, 100.0]])
    out = unpermute_reference(y, index, w)
    # t0: 0.5 * row 0 + 0.25 * row 2; t1: row 1 + 2 * row 4; t2: 3 * row 3, its dropped slot adds nothing
    assert out[:, 0].tolist() == [0.5, 9.0, 9.0] and out[:, 1].tolist() == out[:, 0].tolist()


def test_expert_counts_has_a_static_length_and_takes_a_mask():
    assert expert_counts(EXPERTS, 5).tolist() == [3, 2, 1, 0, 0]  # bincount would have length 3
    mask = torch.tensor([[True, False], [True, True], [False, True]])
    assert expert_counts(EXPERTS, 3, mask).tolist() == [3, 0, 1]
    assert expert_counts(torch.zeros(0, 2, dtype=torch.long), 2).tolist() == [0, 0]
