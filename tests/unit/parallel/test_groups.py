"""moe/parallel/groups.py: DeepSpeed's E + D layout of the expert-parallel groups."""
import pytest

from moe.parallel.groups import create_groups, layout


def test_ep_groups_are_consecutive_and_edp_groups_strided():
    edp, ep = layout(8, 2)
    assert ep == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert edp == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout(4, 4) == ([[0], [1], [2], [3]], [[0, 1, 2, 3]])
    assert layout(3, 1) == ([[0, 1, 2]], [[0], [1], [2]])


def test_ep_size_must_divide_the_world():
    with pytest.raises(ValueError, match=r"parallel.ep_size \(3\) must divide the world size \(4\)"):
        layout(4, 3)


def test_groups_need_a_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("this process has a process group")
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialised"):
        create_groups(2)
