"""moe/train/loop.py: the `Periodic` schedule, the `banner` line, and `_Run`'s pieces -- the step loop,
the periodic work after a step, the train record of a window, evaluation, saving, failing and finishing
-- on a fake setup (a real tiny GPT, a fake engine and scheduler, a byte dataset), with the optimizer
step, evaluation, saving and the process-group shutdown replaced where they would need DeepSpeed. The
whole `train()` runs end to end in tests/integration/test_train.py."""
import json
import math
import os
import time
import types

import pytest
import torch

from moe.errors import TrainingDiverged
from moe.nn.accounting import count_params, flops_per_token
from moe.nn.gpt import GPT
from moe.parallel import CollectiveError
from moe.train import loop
from moe.train.build import TrainingSetup
from moe.train.checkpoint.folders import write_latest
from moe.train.loop import Periodic, _failure_reason, _finite, _Run, banner
from moe.train.step import StepResult
from tests.helpers import pattern_dataset, single_process_group, tiny_gpt_config

CPU = torch.device("cpu")


def _cfg(*overrides):
    return tiny_gpt_config("model.vocab_size=257", "train.seq_len=8", "train.micro_batch_size=2",
                           "train.global_batch_size=4", "train.steps=6", "run.name=unit", *overrides)


class Logger:
    wandb_id = "wandb-xyz"

    def __init__(self):
        self.records, self.closed, self.summaries = [], False, []

    def log(self, record):
        self.records.append(record)

    def summary(self, summary):
        self.summaries.append(dict(summary))

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    ds = pattern_dataset(tmp_path_factory.mktemp("loop_data"), 3000)
    return types.SimpleNamespace(train=ds, val=ds, tokenizer=None, sources=[])


def _run(tmp_path, data, *overrides, moe=True):
    cfg = _cfg(*(["model.moe.num_experts=4"] if moe else []), *overrides)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    setup = TrainingSetup(
        dist_info=types.SimpleNamespace(rank=0, world_size=1, local_rank=0, device=CPU, backend="gloo"),
        data=data, model=model, engine=types.SimpleNamespace(train=lambda: None), optimizer=None,
        scheduler=types.SimpleNamespace(get_last_lr=lambda: [0.25]), dtype=torch.float32, accum=2,
        moe_layers={b.layer_id: b.ffn for b in model.blocks if b.ffn in model.moe_layers()}, freed_memory_kept=True)
    run_dir = tmp_path / "runs" / "unit"
    run_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg, setup, 1, str(run_dir))
    run.state = {"step": 0, "tokens": 0, "flops": 0.0, "wall_s": 0.0, "wandb_id": None}
    run.peak = 1e9
    return run


# ------------------------------------------------------------------------------------ Periodic, banner


def test_periodic_schedules():
    p = Periodic(_cfg("train.steps=10", "train.log_every=3", "train.eval_every=4", "checkpoint.every=5"))
    steps = range(1, 11)
    assert [s for s in steps if p.log(s)] == [3, 6, 9, 10]  # and always the last step
    assert [s for s in steps if p.eval(s)] == [4, 8, 10]
    assert [s for s in steps if p.checkpoint(s)] == [5, 10]
    p = Periodic(_cfg("train.steps=10", "train.eval_every=0", "checkpoint.every=0"))
    assert [s for s in steps if p.eval(s)] == [10] and [s for s in steps if p.checkpoint(s)] == [10]
    p = Periodic(_cfg("train.steps=10", "checkpoint.every=4", "checkpoint.save_final=false"))
    assert [s for s in steps if p.checkpoint(s)] == [4, 8]
    assert not any(Periodic(_cfg("train.steps=10", "checkpoint.save_final=false")).checkpoint(s) for s in steps)


def _banner_setup(moe, freed=True):
    layers = [types.SimpleNamespace(dispatch_backend="reference")] if moe else []
    return types.SimpleNamespace(moe_layers={1: "layer"} if moe else {}, accum=2, freed_memory_kept=freed,
                                 model=types.SimpleNamespace(moe_layers=lambda: layers),
                                 dist_info=types.SimpleNamespace(device=CPU))


def test_banner_line():
    params = {"params_total": 1234567, "params_active": 654321}
    flops = {"flops_per_token": 12345.678}
    line = banner(_cfg(), "runs/unit", params, flops, 64, 2, _banner_setup(moe=True), None)
    assert line == ("[moe] run unit (moe) in runs/unit: params total 1,234,567, active 654,321, training "
                    "FLOPs/token 1.235e+04, 64 tokens/step, world 2, grad accum 2, device cpu, dispatch reference, "
                    "freed host memory kept for reuse")
    dense = banner(_cfg("train.compile=true"), "r", params, flops, 64, 1, _banner_setup(False, False), "step_00000004")
    assert "run unit (dense) in r:" in dense and "dispatch -," in dense
    assert dense.endswith("freed host memory returned to the OS; blocks torch.compile-d (the first step and the "
                          "first evaluation compile); resuming from step_00000004")
    assert "\n" not in dense


# ------------------------------------------------------------------------------------------ _Run


def test_a_run_counts_its_model_and_removes_leftovers_of_killed_saves(tmp_path, data, capsys):
    ckpt = tmp_path / "runs" / "unit" / "checkpoints"
    (ckpt / ".tmp-step_00000003").mkdir(parents=True)
    (ckpt / "step_00000002").mkdir()
    run = _run(tmp_path, data)
    assert sorted(os.listdir(ckpt)) == ["step_00000002"]
    assert f"removed {ckpt}/.tmp-step_00000003, left by an interrupted save" in capsys.readouterr().out
    assert run.params == count_params(run.setup.model)
    assert run.flops == flops_per_token(run.cfg.model, 8)
    assert run.tokens_per_step == 4 * 8  # global batch x seq_len
    assert run.sampler.micro_batch_size == 2 and run.sampler.dp_size == 1 and run.sampler.seed == run.cfg.run.seed
    assert run.folder.checkpoints == str(ckpt)


def test_the_loop_counts_steps_tokens_and_flops_and_does_the_periodic_work(tmp_path, data, monkeypatch):
    run = _run(tmp_path, data, "train.steps=3")
    losses = iter([4.0, 3.0, 2.0])
    calls = []

    def fake_step(engine, model, next_batch, accum, device, dtype):
        calls.append((accum, device, dtype))
        return StepResult(next(losses), 1.5)

    monkeypatch.setattr(loop, "optimizer_step", fake_step)
    after = []
    run.after_step = lambda step, stop: after.append((step, stop, run.window_loss, run.window_steps))
    preemption = types.SimpleNamespace(requested=lambda device, nonfinite: (False, nonfinite))
    run.loop(preemption)
    assert calls == [(2, CPU, torch.float32)] * 3
    assert run.state["step"] == 3 and run.state["tokens"] == 3 * 32
    assert run.state["flops"] == 3 * 32 * run.flops["flops_per_token"]
    assert after == [(1, False, 4.0, 1), (2, False, 7.0, 2), (3, False, 9.0, 3)]
    assert run.grad_norm == 1.5


def test_a_stop_ends_the_loop_after_that_steps_work(tmp_path, data, monkeypatch):
    run = _run(tmp_path, data, "train.steps=10")
    monkeypatch.setattr(loop, "optimizer_step", lambda *a: StepResult(1.0, 1.0))
    after = []
    run.after_step = lambda step, stop: after.append((step, stop))
    run.loop(types.SimpleNamespace(requested=lambda device, nonfinite: (run.state["step"] == 2, False)))
    assert after == [(1, False), (2, True)] and run.state["step"] == 2


@pytest.mark.parametrize("loss,norm", [(float("nan"), 1.0), (2.0, float("inf"))])
def test_a_non_finite_step_raises_before_any_periodic_work(tmp_path, data, monkeypatch, loss, norm):
    run = _run(tmp_path, data, "train.steps=10")
    results = iter([StepResult(1.0, 1.0), StepResult(loss, norm)])
    monkeypatch.setattr(loop, "optimizer_step", lambda *a: next(results))
    after, seen = [], []

    def requested(device, nonfinite):
        seen.append(nonfinite)
        return False, nonfinite

    run.after_step = lambda step, stop: after.append(step)
    with pytest.raises(TrainingDiverged) as info:
        run.loop(types.SimpleNamespace(requested=requested))
    assert seen == [False, True] and after == [1]
    assert str(info.value).startswith(f"step 2: non-finite training (loss {loss}, gradient norm {norm}; on some "
                                      f"rank); stopped without saving (no checkpoint was saved).")


def test_after_step_runs_what_the_schedule_says_and_a_stop_saves(tmp_path, data):
    run = _run(tmp_path, data, "train.steps=10", "train.log_every=2", "train.eval_every=3", "checkpoint.every=4")
    done = []
    run.log_window = lambda step: done.append(("log", step))
    run.evaluate = lambda step: done.append(("eval", step))
    run.save = lambda step: done.append(("save", step))
    for step in range(1, 5):
        run.after_step(step, stop=False)
    run.after_step(5, stop=True)
    assert done == [("log", 2), ("eval", 3), ("log", 4), ("save", 4), ("save", 5)]


def test_evaluation_and_saving_time_is_not_training_time(tmp_path, data, monkeypatch):
    run = _run(tmp_path, data, "train.steps=2", "train.eval_every=1", "checkpoint.every=1", "train.log_every=100")
    clock = iter([100.0, 102.5, 200.0, 200.75])
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    run.evaluate = run.save = lambda step: None
    run.window_t0 = 10.0
    run.after_step(1, stop=False)
    assert run.window_t0 == pytest.approx(10.0 + 2.5 + 0.75)


def test_log_window_writes_the_train_record_and_starts_a_new_window(tmp_path, data):
    run = _run(tmp_path, data)
    run.logger = Logger()
    model = run.setup.model.train()
    x = torch.randint(0, 257, (2, 8))
    model(x, x)  # router statistics for the window
    run.window_loss, run.window_steps, run.grad_norm = 6.0, 3, 0.5
    run.state.update(step=3, tokens=96, flops=1e6, wall_s=1.0)
    run.window_t0 = time.perf_counter() - 0.5
    with single_process_group(tmp_path):
        run.log_window(3)
    (record,) = run.logger.records
    assert record["step"] == 3 and record["tokens"] == 96 and record["flops"] == 1e6
    assert record["loss/train"] == 2.0 == run.train_loss  # the window's mean over steps (and ranks)
    assert record["lr"] == 0.25 and record["grad_norm"] == 0.5
    assert 0 < record["speed/tokens_per_s"] <= 3 * 32 / 0.5
    assert record["speed/mfu"] == pytest.approx(record["speed/tokens_per_s"] * run.flops["flops_per_token"] / 1e9)
    assert {f"router/layer{i}/load" for i in run.setup.moe_layers} <= set(record)
    assert not any(k.startswith("ep/") for k in record)  # no expert parallelism
    assert run.state["wall_s"] >= 1.5
    assert (run.window_loss, run.window_steps) == (0.0, 0)


def test_evaluate_logs_the_validation_loss_or_stops_on_a_non_finite_one(tmp_path, data, monkeypatch):
    run = _run(tmp_path, data)
    run.logger = Logger()
    run.state.update(step=4, tokens=128, flops=2e6)
    seen = []
    monkeypatch.setattr(loop, "evaluate", lambda *a: seen.append(a) or 2.0)
    run.evaluate(4)
    s = run.setup
    assert seen == [(s.engine, s.data.val, run.cfg, s.dist_info, s.dtype)]
    assert run.logger.records == [{"step": 4, "tokens": 128, "flops": 2e6, "loss/val": 2.0,
                                   "ppl/val": pytest.approx(math.exp(2.0))}]
    assert run.val_loss == 2.0
    monkeypatch.setattr(loop, "evaluate", lambda *a: float("nan"))
    with pytest.raises(TrainingDiverged, match=r"^step 5: the validation loss is nan; stopped without saving "
                                               r"\(no checkpoint was saved\)$"):
        run.evaluate(5)
    ckpt = run.folder.checkpoints
    os.makedirs(os.path.join(ckpt, "step_00000004"))
    write_latest(ckpt, "step_00000004")
    with pytest.raises(TrainingDiverged, match=f"the last checkpoint, {ckpt}/step_00000004, is untouched"):
        run.evaluate(6)
    assert len(run.logger.records) == 1


def test_save_hands_the_full_train_state_to_the_checkpoint(tmp_path, data, monkeypatch):
    run = _run(tmp_path, data, "checkpoint.keep_last=3")
    run.logger = Logger()
    run.sampler.next_batch()
    saved = []
    monkeypatch.setattr(loop.saving, "save", lambda *a: saved.append(a))
    run.state["step"] = 5
    run.save(5)
    ((engine, ckpt_dir, step, state, config_yaml, keep_last, rank),) = saved
    assert engine is run.setup.engine and ckpt_dir == run.folder.checkpoints and (step, keep_last, rank) == (5, 3, 0)
    assert state is run.state and state["sampler"] == run.sampler.state_dict() and state["sampler"]["position"] == 2
    assert set(state["rng"]) == {"python", "numpy", "torch"} and state["wandb_id"] == "wandb-xyz"
    assert "name: unit" in config_yaml


def test_fail_writes_why_and_names_a_dead_peer(tmp_path, data, monkeypatch):
    run = _run(tmp_path, data)
    run.logger = Logger()
    run.summary = {"name": "unit", "status": "running"}
    run.fail(ValueError("bad thing\nmore detail"))
    summary = json.loads(open(run.folder.summary).read())
    assert summary == {"name": "unit", "status": "failed", "reason": "ValueError: bad thing"}
    assert run.logger.closed
    monkeypatch.setattr(loop.parallel, "collective_failure", lambda exc, rank, world, timeout: "rank 0 of 1: gone")
    with pytest.raises(CollectiveError, match="^rank 0 of 1: gone$"):
        run.fail(RuntimeError("Connection closed by peer"))


@pytest.mark.parametrize("stopped", [0, 15])
def test_finish_writes_the_summary_and_shuts_the_group_down(tmp_path, data, monkeypatch, stopped):
    run = _run(tmp_path, data)
    run.logger = Logger()
    shut = []
    monkeypatch.setattr(loop.parallel, "shutdown_distributed", lambda: shut.append(True))
    run.summary = {"name": "unit", "status": "running"}
    run.state.update(step=6, tokens=192, flops=3e6, wall_s=4.0)
    run.train_loss, run.val_loss = 2.5, 2.0
    preemption = types.SimpleNamespace(stopped=stopped, signal_name=lambda: "SIGTERM")
    summary = run.finish(preemption)
    expected = {"name": "unit", "status": "preempted" if stopped else "finished", "train_loss": 2.5, "val_loss": 2.0,
                "val_ppl": pytest.approx(math.exp(2.0)), "tokens": 192, "steps": 6, "training_flops": 3e6,
                "wall_s": 4.0, "tokens_per_s": 48.0}
    if stopped:
        expected["reason"] = "stopped on SIGTERM after step 6; checkpoint saved"
    assert summary == expected
    assert json.loads(open(run.folder.summary).read()) == expected
    assert run.logger.summaries == [summary] and run.logger.closed and shut == [True]


def test_finish_of_a_run_without_wall_time_or_validation(tmp_path, data, monkeypatch):
    run = _run(tmp_path, data)
    monkeypatch.setattr(loop.parallel, "shutdown_distributed", lambda: None)
    run.summary = {}
    summary = run.finish(types.SimpleNamespace(stopped=0))
    assert math.isnan(summary["tokens_per_s"]) and math.isnan(summary["val_loss"])
    on_disk = json.loads(open(run.folder.summary).read())
    assert on_disk["tokens_per_s"] is None and on_disk["val_ppl"] is None  # JSON has no NaN


# -------------------------------------------------------------------------------------- small pieces


def test_failure_reasons_are_one_short_line():
    assert _failure_reason(KeyboardInterrupt()) == "interrupted (KeyboardInterrupt)"
    assert _failure_reason(RuntimeError("first\nsecond")) == "RuntimeError: first"
    assert _failure_reason(OSError()) == "OSError: "
    assert len(_failure_reason(ValueError("x" * 1000))) == 500


def test_finite_ignores_missing_values():
    assert _finite(1.0, 2.0) and _finite(1.0, None)
    assert not _finite(float("nan"), 1.0) and not _finite(1.0, float("-inf"))
