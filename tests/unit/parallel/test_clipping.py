"""moe/parallel/clipping.py in one process (no expert parameters, so no collective): DeepSpeed's clipping
rule, and what `fix_engine_clipping` replaces on which engine."""
import math

import pytest
import torch

from moe.parallel.clipping import clip_grad_norm_, fix_engine_clipping, global_grad_norm


def _params(*grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


def test_norm_and_clipping_rule():
    params = _params(torch.tensor([3.0, 0.0]), torch.tensor([[4.0]]))
    params.append(torch.nn.Parameter(torch.ones(2)))  # no gradient: left out
    assert float(global_grad_norm(params)) == pytest.approx(5.0)
    norm = clip_grad_norm_(params, max_norm=1.0)
    assert float(norm) == pytest.approx(5.0)
    assert float(global_grad_norm(params)) == pytest.approx(5.0 / (5.0 + 1e-6))
    unclipped = _params(torch.tensor([0.3, 0.4]))
    version = unclipped[0].grad._version
    clip_grad_norm_(unclipped, max_norm=1.0)
    assert torch.equal(unclipped[0].grad, torch.tensor([0.3, 0.4]))
    assert unclipped[0].grad._version == version  # on CPU a coefficient of 1 skips the pass
    assert float(global_grad_norm([])) == 0.0


class _Engine:
    def __init__(self, zero=0, clip=1.0, optimizer=None, params=()):
        self._zero, self._clip = zero, clip
        self.optimizer = optimizer
        self.module = torch.nn.ParameterList(params)

    def zero_optimization_stage(self):
        return self._zero

    def gradient_clipping(self):
        return self._clip


def test_zero_or_no_clipping_is_left_alone():
    for engine in (_Engine(zero=1), _Engine(clip=0.0)):
        fix_engine_clipping(engine)
        assert "clip_fp32_gradients" not in vars(engine)


def test_fp32_clipping_replaced():
    params = _params(torch.tensor([6.0, 8.0]))
    engine = _Engine(params=params, optimizer=torch.optim.SGD(params, lr=1.0))
    fix_engine_clipping(engine)
    engine.clip_fp32_gradients()
    assert engine._global_grad_norm == pytest.approx(10.0)
    assert float(params[0].grad.norm()) == pytest.approx(10.0 / (10.0 + 1e-6))


def test_fp32_clipping_reuses_the_norm_read_before_the_step():
    """moe/parallel/engine.py `grad_norm` reads the norm at the boundary; the engine's clipping then uses
    that value once instead of a second pass over the gradients, and computes it when none was read."""
    from moe.parallel.engine import grad_norm

    params = _params(torch.tensor([6.0, 8.0]))
    engine = _Engine(params=params, optimizer=torch.optim.SGD(params, lr=1.0))
    fix_engine_clipping(engine)
    assert grad_norm(engine) == pytest.approx(10.0)
    params[0].grad = torch.tensor([3.0, 4.0])  # only to show which norm the clipping used
    engine.clip_fp32_gradients()
    assert engine._global_grad_norm == pytest.approx(10.0)  # the remembered one, used once
    assert float(params[0].grad.norm()) == pytest.approx(5.0 / (10.0 + 1e-6))
    engine.clip_fp32_gradients()
    assert engine._global_grad_norm == pytest.approx(5.0 / (10.0 + 1e-6))  # computed again


def test_low_precision_clipping_unscales_the_norm():
    params = _params(torch.tensor([0.0, 40.0]))

    class Wrapper:
        clip_grad = 1.0
        loss_scale_config = type("Scale", (), {"cur_scale": 4.0})()
        fp16_groups = [params]
        fp32_groups = [[p.detach().clone() for p in params]]

        def step(self):
            self.stepped_grad = params[0].grad.clone()

    opt = Wrapper()
    fix_engine_clipping(_Engine(optimizer=opt, clip=2.0))
    opt.step()
    assert opt.clip_grad == 0.0
    assert opt._global_grad_norm == pytest.approx(10.0)  # 40 / loss scale 4
    assert float(opt.stepped_grad.norm()) == pytest.approx(40.0 * 2.0 / (10.0 + 1e-6))
    assert not math.isnan(opt._global_grad_norm)
