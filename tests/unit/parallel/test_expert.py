"""moe/parallel/expert.py in one process: which experts a rank holds, how they are marked, and what is
refused (the exchange itself runs in tests/integration/test_expert_parallel.py)."""
import pytest
import torch

from moe.parallel import deepspeed as ds
from moe.parallel.expert import (EXPERT_PARAM_NAMES, apply_expert_parallel, check_supported, expert_layout,
                                 gather_experts, model_groups, moe_layers, shard_experts)
from moe.parallel.groups import ExpertParallelGroups
from tests.helpers import layer


def _groups(ep_size, ep_rank, world_size=None):
    world_size = world_size or ep_size
    return ExpertParallelGroups(
        ep_size=ep_size, ep_rank=ep_rank, ep_group=None, ep_ranks=list(range(ep_size)),
        edp_size=world_size // ep_size, edp_rank=0, edp_group=None, edp_ranks=[ep_rank],
        group_name=f"ep_size_{ep_size}", timeout_s=0.0, rank=ep_rank, world_size=world_size)


@pytest.mark.parametrize("ep_rank", [0, 1, 3])
def test_a_rank_keeps_its_slice_of_the_experts_marked_as_expert_parameters(ep_rank):
    torch.manual_seed(0)
    moe = layer(num_experts=8)
    full = {name: getattr(moe.experts, name).detach().clone() for name in EXPERT_PARAM_NAMES}
    assert expert_layout(moe.experts) == (0, 8, 8)
    shard_experts(moe.experts, _groups(4, ep_rank))
    start = 2 * ep_rank
    assert expert_layout(moe.experts) == (start, 2, 8)
    assert moe.experts.num_experts == 2
    for name in EXPERT_PARAM_NAMES:
        p = getattr(moe.experts, name)
        assert isinstance(p, torch.nn.Parameter) and p.requires_grad
        assert torch.equal(p, full[name][start:start + 2])
        assert ds.is_expert_param(p) and p.group_name == "ep_size_4"
    assert {n for n, p in moe.named_parameters() if ds.is_expert_param(p)} == {
        f"experts.{name}" for name in EXPERT_PARAM_NAMES}


def test_layouts_that_cannot_be_split_are_refused():
    model = torch.nn.Sequential(layer(num_experts=4))
    check_supported(model, 2)
    with pytest.raises(ValueError, match=r"parallel.ep_size \(3\) must divide model.moe.num_experts \(4\)"):
        check_supported(model, 3)
    model[0].router.supports_expert_parallel = False
    model[0].router.expert_parallel_reason = "it needs every rank's tokens"
    with pytest.raises(ValueError, match="cannot run expert-parallel.*every rank's tokens"):
        check_supported(model, 2)


def test_ep1_changes_nothing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(layer(), torch.nn.Linear(16, 16), layer())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert moe_layers(model) == [model[0], model[2]]
    assert apply_expert_parallel(model, 1) is None
    assert model_groups(model) is None
    assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()
    assert all(torch.equal(p, before[n]) and not ds.is_expert_param(p) for n, p in model.named_parameters())
    assert all(type(m).__name__ == "MoELayer" for m in moe_layers(model))
    t = torch.randn(4, 3)
    assert gather_experts(t, None) is t and gather_experts(t, _groups(1, 0)) is t
