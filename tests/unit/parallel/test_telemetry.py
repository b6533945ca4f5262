"""moe/parallel/telemetry.py: which token exchanges `exchanges` finds, and `ep_metrics` -- the exchange
time and rows accumulated since the last call, reduced over the world, per step and per window, and
reset -- on models without expert parallelism and with fake exchange objects carrying the counters
(real collectives in a 1-process gloo group; a second rank simulated where the imbalance needs one)."""
import types

import pytest
import torch
import torch.distributed as dist

from moe.parallel.telemetry import ep_metrics, exchanges
from tests.helpers import layer, single_process_group, tiny_gpt_config


class Exchange:
    """What ep_metrics reads and resets on a TokenExchange."""

    def __init__(self, exchange_s, rows):
        self.exchange_s, self.rows = exchange_s, rows


def _model_with_exchanges(*counters):
    """Two MoE layers (and a dense one between them); layer i gets counters[i] (None: no exchange)."""
    model = torch.nn.Sequential(layer(), torch.nn.Linear(16, 16), layer())
    moe = [model[0], model[2]]
    for m, c in zip(moe, counters):
        m.experts.token_exchange = None if c is None else Exchange(*c)
    return model, moe


def test_no_expert_parallelism_no_exchanges_no_metrics(monkeypatch):
    from moe.nn.gpt import GPT

    def no_collective(*args, **kwargs):
        raise AssertionError("ep_metrics ran a collective without expert parallelism")

    monkeypatch.setattr(torch, "distributed", types.SimpleNamespace(all_reduce=no_collective, get_world_size=no_collective))
    for model in (GPT(tiny_gpt_config().model), GPT(tiny_gpt_config("model.moe.num_experts=4").model), torch.nn.Linear(2, 2)):
        assert exchanges(model) == []
        assert ep_metrics(model, steps=5, window_s=1.0) == {}  # no collective: no process group needed


def test_exchanges_are_the_moe_layers_token_exchanges_in_order():
    model, moe = _model_with_exchanges((1.0, 10), None)
    assert exchanges(model) == [moe[0].experts.token_exchange]
    moe[1].experts.token_exchange = Exchange(2.0, 20)
    assert exchanges(model) == [moe[0].experts.token_exchange, moe[1].experts.token_exchange]


def test_one_rank_metrics_per_step_and_window_and_the_counters_reset(tmp_path):
    model, moe = _model_with_exchanges((1.5, 300), (0.5, 100))
    with single_process_group(tmp_path):
        m = ep_metrics(model, steps=4, window_s=8.0)
        assert m == pytest.approx({"ep/exchange_s": 2.0 / 4, "ep/exchange_share": 2.0 / 8.0,
                                   "ep/rank_token_imbalance": 1.0, "ep/rows_per_rank_max": 400 / 4})
        assert [(l.experts.token_exchange.exchange_s, l.experts.token_exchange.rows) for l in moe] == [(0.0, 0)] * 2
        # the next window starts from zero
        moe[0].experts.token_exchange.exchange_s, moe[0].experts.token_exchange.rows = 0.25, 8
        assert ep_metrics(model, steps=1, window_s=1.0) == pytest.approx(
            {"ep/exchange_s": 0.25, "ep/exchange_share": 0.25, "ep/rank_token_imbalance": 1.0,
             "ep/rows_per_rank_max": 8.0})


def test_degenerate_windows(tmp_path):
    model, _ = _model_with_exchanges((3.0, 0), None)
    with single_process_group(tmp_path):
        m = ep_metrics(model, steps=0, window_s=0.0)
    # no steps counts as one, no wall time gives no share, no rows is perfect balance
    assert m == {"ep/exchange_s": 3.0, "ep/exchange_share": 0.0, "ep/rank_token_imbalance": 1.0,
                 "ep/rows_per_rank_max": 0.0}


def test_the_slowest_rank_and_the_busiest_rank_are_reported(monkeypatch):
    """A world of two, the other rank simulated: its seconds and rows join the reductions."""
    other = {"seconds": 5.0, "rows": 100.0}
    ops = []

    def all_reduce(t, op=None):
        ops.append(op)
        if op == dist.ReduceOp.MAX:
            t.copy_(torch.maximum(t, torch.tensor([other["seconds"], other["rows"]], dtype=t.dtype)))
        else:
            t += other["rows"]

    fake = types.SimpleNamespace(all_reduce=all_reduce, get_world_size=lambda: 2, ReduceOp=dist.ReduceOp)
    monkeypatch.setattr(torch, "distributed", fake)  # what `import torch.distributed as dist` binds
    model, _ = _model_with_exchanges((2.0, 300), None)  # this rank: faster, but three times the rows
    m = ep_metrics(model, steps=10, window_s=20.0)
    assert ops == [dist.ReduceOp.MAX, None]  # one MAX (seconds, rows), one SUM (rows)
    assert m == pytest.approx({"ep/exchange_s": 0.5,            # the slower rank's 5 s over 10 steps
                               "ep/exchange_share": 0.25,       # 5 s of a 20 s window
                               "ep/rank_token_imbalance": 1.5,  # max 300 / mean 200
                               "ep/rows_per_rank_max": 30.0})
