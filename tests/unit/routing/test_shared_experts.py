"""Shared experts (DeepSeekMoE): any number, seen by every token, next to the routed experts."""
import pytest
import torch

from tests.helpers import layer


@pytest.mark.parametrize("n", [1, 3])
def test_shared_experts_add_to_routed_output_for_every_token(n):
    torch.manual_seed(0)
    m = layer(f"model.moe.num_shared_experts={n}", "model.moe.capacity_factor=0.25", "model.moe.min_capacity=1",
              "model.moe.dispatch=reference")
    assert m.shared_experts.w13.weight.shape[0] == 2 * 32 * n  # n experts of expert_hidden, fused
    x = torch.randn(1, 32, 16)
    y = m(x)
    shared = m.shared_experts(x.reshape(-1, 16)).view_as(x)
    routed_only = y - shared
    dropped = routed_only.abs().sum(-1)[0] < 1e-7
    assert dropped.any()  # a token no routed expert kept still gets the shared experts
    torch.testing.assert_close(y[0][dropped], shared[0][dropped])
    assert (y[0][dropped].abs().sum(-1) > 0).all()
