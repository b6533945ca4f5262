"""moe/train/step.py: one optimizer step over `accum` micro-batches, against a fake engine that
records what the step does (the real DeepSpeed engine is exercised by the integration tests)."""
import types

import torch

from moe.train import step as step_module
from moe.train.step import optimizer_step


class FakeEngine:
    def __init__(self, accum, zero):
        self.accum, self.zero, self.calls, self.micro = accum, zero, [], 0

    def zero_optimization_stage(self):
        return self.zero

    def __call__(self, x, y):
        self.calls.append("forward")
        return types.SimpleNamespace(loss=torch.tensor(float(self.micro + 1)), aux_loss=torch.tensor(0.0))

    def backward(self, loss):
        self.calls.append("backward")

    def is_gradient_accumulation_boundary(self):
        return self.micro == self.accum - 1

    def step(self):
        self.calls.append("step")
        self.micro += 1


def _run(monkeypatch, zero):
    engine = FakeEngine(accum=3, zero=zero)
    monkeypatch.setattr(step_module, "global_grad_norm", lambda e: e.calls.append("norm") or 2.0)
    monkeypatch.setattr(step_module, "end_optimizer_step", lambda m: engine.calls.append("end"))
    seen = []
    result = optimizer_step(engine, None, lambda: (torch.zeros(1), torch.zeros(1)), 3, torch.device("cpu"),
                            torch.float32, before_step=seen.append)
    return engine, result, seen


def test_norm_before_the_step_without_zero(monkeypatch):
    engine, result, seen = _run(monkeypatch, zero=0)
    assert engine.calls[-4:] == ["backward", "norm", "step", "end"]
    assert result.grad_norm == 2.0 and seen == [2.0]
    assert result.loss == (1 + 2 + 3) / 3  # the mean of the micro-batch losses


def test_norm_after_the_step_under_zero(monkeypatch):
    engine, result, seen = _run(monkeypatch, zero=1)
    assert engine.calls[-4:] == ["backward", "step", "norm", "end"]
    assert engine.calls.count("norm") == 1 and engine.calls.count("end") == 1
    assert seen == []  # before_step only where the reduced gradients are still there (ZeRO 0)
