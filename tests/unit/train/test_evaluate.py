"""moe/train/evaluate.py: the validation loss is the mean over the first `train.eval_batches`
micro-batches of every rank, the same batches each time, under no_grad and the run's autocast, with
the engine back in training mode afterwards. Fake engines (a callable returning `.loss`) and a real
model, on a tiny byte dataset with known tokens, in a 1-process gloo group (a second rank simulated)."""
import types

import pytest
import torch

from moe.config import load_config
from moe.nn.gpt import GPT
from moe.train import evaluate as evaluate_module
from moe.train.evaluate import evaluate
from tests.helpers import pattern_dataset, single_process_group

CPU = types.SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))


def _cfg(*overrides):
    return load_config(None, ["train.seq_len=8", "train.micro_batch_size=2", "train.eval_batches=3", *overrides])


class FakeEngine:
    """loss = the mean first input token of the micro-batch; records modes, grad and autocast state."""

    def __init__(self):
        self.calls, self.firsts = [], []

    def eval(self):
        self.calls.append("eval")

    def train(self):
        self.calls.append("train")

    def __call__(self, x, y):
        assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
        self.calls.append(("forward", torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"),
                           torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
        self.firsts.append(x[:, 0].tolist())
        return types.SimpleNamespace(loss=x[:, 0].double().mean())


@pytest.fixture
def dataset(tmp_path):
    return pattern_dataset(tmp_path, 2000)  # token k is 33 + k % 90: sequence i starts with 33 + 8 i


def test_the_mean_loss_of_the_first_eval_batches_the_same_each_time(tmp_path, dataset):
    engine = FakeEngine()
    with single_process_group(tmp_path):
        first = evaluate(engine, dataset, _cfg(), CPU, torch.float32)
        again = evaluate(engine, dataset, _cfg(), CPU, torch.float32)
    # batches (0, 1), (2, 3), (4, 5) in order, no shuffling: mean first token 37, 53, 69
    assert engine.firsts[:3] == [[33, 41], [49, 57], [65, 73]]
    assert first == again == pytest.approx(53.0)
    assert engine.firsts[3:] == engine.firsts[:3]
    assert engine.calls[:5] == ["eval", ("forward", False, False, None), ("forward", False, False, None),
                                ("forward", False, False, None), "train"]


def test_eval_batches_sets_how_many_micro_batches(tmp_path, dataset):
    engine = FakeEngine()
    with single_process_group(tmp_path):
        assert evaluate(engine, dataset, _cfg("train.eval_batches=1"), CPU, torch.float32) == pytest.approx(37.0)
    assert len(engine.firsts) == 1


def test_bf16_runs_under_cpu_autocast(tmp_path, dataset):
    engine = FakeEngine()
    with single_process_group(tmp_path):
        evaluate(engine, dataset, _cfg("train.eval_batches=2"), CPU, torch.bfloat16)
    assert [c for c in engine.calls if c[0] == "forward"] == [("forward", False, True, torch.bfloat16)] * 2
    assert not torch.is_autocast_enabled("cpu")


def test_every_rank_evaluates_its_own_slice_and_the_mean_is_over_all_ranks(monkeypatch, dataset):
    """Rank 1 of 2 (rank 0 simulated in the all-reduce): rank 1 takes the second half of each chunk of
    2 x 2 sequences; the result is the mean over both ranks' batches."""
    reduced = []

    def all_reduce(t):
        reduced.append(t.clone())
        t += torch.tensor([100.0 * 3, 3.0], dtype=t.dtype)  # rank 0: three batches of loss 100

    monkeypatch.setattr(evaluate_module, "dist", types.SimpleNamespace(all_reduce=all_reduce))
    engine = FakeEngine()
    rank1 = types.SimpleNamespace(rank=1, world_size=2, device=torch.device("cpu"))
    loss = evaluate(engine, dataset, _cfg(), rank1, torch.float32)
    assert engine.firsts == [[49, 57], [81, 89], [113, 121]]  # sequences (2, 3), (6, 7), (10, 11)
    assert reduced[0].dtype == torch.float64 and reduced[0].tolist() == [53.0 + 85.0 + 117.0, 3.0]
    assert loss == pytest.approx((53.0 + 85.0 + 117.0 + 300.0) / 6)


def test_a_real_model_is_evaluated_on_those_batches_and_left_training(tmp_path, dataset):
    cfg = _cfg("model.vocab_size=257", "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
               "model.max_seq_len=8", "model.ffn_hidden=32")
    torch.manual_seed(0)
    model = GPT(cfg.model).train()
    with torch.no_grad():
        model.eval()
        expected = []
        for start in (0, 2, 4):
            w = torch.from_numpy(dataset.sequences([start, start + 1], 8))
            expected.append(float(model(w[:, :-1], w[:, 1:]).loss))
        model.train()
    with single_process_group(tmp_path):
        loss = evaluate(model, dataset, cfg, CPU, torch.float32)
    assert loss == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_evaluate_sources_is_the_weighted_mean_of_each_sources_loss(monkeypatch):
    seen = []
    monkeypatch.setattr(evaluate_module, "evaluate", lambda engine, ds, *a: seen.append(ds) or {"c": 2.0, "d": 4.0}[ds])
    data = types.SimpleNamespace(val="whole", sources=[types.SimpleNamespace(name="code", weight=0.75, val="c"),
                                                       types.SimpleNamespace(name="docs", weight=0.25, val="d")])
    overall, per_source = evaluate_module.evaluate_sources(None, data, None, CPU, torch.float32)
    assert seen == ["c", "d"] and per_source == {"loss/val/code": 2.0, "loss/val/docs": 4.0}
    assert overall == pytest.approx(0.75 * 2.0 + 0.25 * 4.0)
    alone = types.SimpleNamespace(val="c", sources=[])
    assert evaluate_module.evaluate_sources(None, alone, None, CPU, torch.float32) == (2.0, {})
