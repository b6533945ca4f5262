import pytest
import torch

from moe.config import ConfigError, load_config
from moe.routing.switch import SwitchRouter
from moe.validate import validate
from tests.helpers import router


def test_switch_is_top1_argmax():
    torch.manual_seed(0)
    r = router("model.moe.router=switch", "model.moe.top_k=1")
    assert isinstance(r, SwitchRouter)
    x = torch.randn(50, 4)
    d = r(x)
    assert d.expert_indices.shape == (50, 1)
    assert torch.equal(d.expert_indices[:, 0], d.scores.argmax(-1))
    torch.testing.assert_close(d.gate_weights[:, 0], d.scores.max(-1).values)  # raw probability, no renorm


def test_switch_needs_top_k_1():
    cfg = load_config("experiments/debug_moe.yaml", ["model.moe.router=switch"])
    with pytest.raises(ConfigError, match=r"router=switch.*model\.moe\.top_k=1"):
        validate(cfg)
