"""moe/parallel/exchange.py: the regrouping of received rows by local expert (the collectives run in
tests/integration/test_expert_parallel.py)."""
import torch

from moe.parallel.exchange import inverse_permutation, local_expert_order


def test_received_rows_are_regrouped_by_local_expert_then_source_rank():
    recv = torch.tensor([[2, 0, 1],   # from rank 0: 2 rows for local expert 0, 1 for expert 2
                         [1, 3, 0]])  # from rank 1
    # received order: (src, expert) blocks (0,0)x2 (0,2)x1 (1,0)x1 (1,1)x3
    received = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    order = local_expert_order(recv)
    assert received[order].tolist() == [0, 1, 3, 4, 5, 6, 2]
    assert torch.equal(received[order][inverse_permutation(order)], received)


def test_no_rows():
    order = local_expert_order(torch.zeros(2, 2, dtype=torch.int64))
    assert order.numel() == 0 and inverse_permutation(order).numel() == 0
