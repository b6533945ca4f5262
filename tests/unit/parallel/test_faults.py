"""moe/parallel/faults.py: the test-only switches are off unless set, and refuse a malformed spec."""
import pytest
import torch

from moe.parallel import faults


def test_unset_switches_change_nothing(monkeypatch):
    monkeypatch.delenv("MOE_TEST_FAULT", raising=False)
    monkeypatch.delenv("MOE_TEST_EXPERT_GRAD_SCALE", raising=False)
    assert faults.exchange_fault() is None
    faults.maybe_fault(None, 0)
    assert faults.expert_grad_scale() == 1.0
    experts = torch.nn.Linear(2, 2)
    faults.scale_expert_gradients([experts], ["weight"])
    experts.weight.sum().backward()
    assert torch.equal(experts.weight.grad, torch.ones(2, 2))


def test_fault_spec(monkeypatch):
    monkeypatch.setenv("MOE_TEST_FAULT", "hang:1:5")
    assert faults.exchange_fault() == ("hang", 1, 5)
    monkeypatch.setenv("MOE_TEST_FAULT", "crash:1:5")
    with pytest.raises(ValueError, match="expected exit\\|hang:RANK:CALL"):
        faults.exchange_fault()


def test_another_ranks_fault_only_counts(monkeypatch):
    monkeypatch.setattr(faults, "_FAULT_CALLS", [0])
    for _ in range(3):
        faults.maybe_fault(("exit", 1, 2), rank=0)  # rank 1's fault: rank 0 goes on
    assert faults._FAULT_CALLS == [3]


def test_expert_gradients_scaled(monkeypatch):
    monkeypatch.setenv("MOE_TEST_EXPERT_GRAD_SCALE", "2")
    experts = torch.nn.Linear(2, 2)
    faults.scale_expert_gradients([experts], ["weight"])
    experts(torch.ones(1, 2)).sum().backward()
    assert torch.equal(experts.weight.grad, 2 * torch.ones(2, 2))
    assert torch.equal(experts.bias.grad, torch.ones(2))
