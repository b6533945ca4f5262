import pytest
import torch

from moe.config import load_config
from moe.layer import MoELayer


def moe_cfg(*overrides):
    return load_config(None, ["model.vocab_size=10", "model.moe.num_experts=4", *overrides]).model.moe


def test_capacity_drops_and_dropped_tokens_contribute_zero():
    torch.manual_seed(0)
    cfg = moe_cfg("model.moe.top_k=1", "model.moe.capacity_factor=0.5", "model.moe.min_capacity=1")
    layer = MoELayer(16, 32, cfg, 0.02, 0.02)
    with torch.no_grad():  # send every token to expert 0
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0
    x = torch.rand(1, 8, 16) + 0.1
    y = layer(x)
    # capacity = ceil(0.5 * 8 * 1 / 4) = 1: one token kept, seven dropped (output zero -> residual only)
    nonzero = (y.abs().sum(-1) > 0).sum()
    assert int(nonzero) == 1
    assert layer.stats.dropped == 7


def test_eval_uses_eval_capacity_factor():
    cfg = moe_cfg("model.moe.capacity_factor=1.0", "model.moe.eval_capacity_factor=0")
    layer = MoELayer(16, 32, cfg, 0.02, 0.02)
    assert layer.capacity(100) == 50
    layer.eval()
    assert layer.capacity(100) is None


@pytest.mark.parametrize("impl", ["loop", "padded"])
def test_expert_impls_agree(impl):
    torch.manual_seed(0)
    ref = MoELayer(16, 32, moe_cfg("model.moe.experts_impl=loop"), 0.02, 0.02)
    other = MoELayer(16, 32, moe_cfg(f"model.moe.experts_impl={impl}"), 0.02, 0.02)
    other.load_state_dict(ref.state_dict())
    x = torch.randn(2, 10, 16)
    torch.testing.assert_close(other(x), ref(x), rtol=1e-5, atol=1e-6)
