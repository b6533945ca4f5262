"""moe/metrics/sinks.py: metrics.jsonl and the W&B sink (a fake wandb module, no W&B process)."""
import json
import sys
import types

from moe.config import load_config
from moe.metrics.sinks import FLOPS_AXIS, MetricLogger, training_env, wandb_mode
from tests.helpers import ROOT


def _cfg(mode="disabled"):
    return load_config(f"{ROOT}/experiments/debug_moe.yaml", [f"logging.wandb.mode={mode}"])


def test_logger_sends_one_heatmap_image_per_eval_and_no_list_keys(tmp_path, monkeypatch):
    logged = []

    class FakeRun:
        def define_metric(self, *a, **k):
            pass

        def log(self, data, step):
            logged.append((step, data))

    fake = types.SimpleNamespace(init=lambda **kw: FakeRun(), Image=lambda arr, caption=None: ("image", arr.shape))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = _cfg("offline")
    logger = MetricLogger(str(tmp_path), cfg, {}, None)
    for step in (5, 10):
        logger.log({"step": step, "tokens": step, "loss/train": 1.0, "router/layer0/load": [0.5, 0.5],
                    "router/layer0/cv": 0.0})
    logger.log({"step": 10, "tokens": 10, "loss/val": 1.0})
    assert [("router/load_heatmap" in d) for _, d in logged] == [False, False, True]
    assert all(not isinstance(v, list) for _, d in logged for v in d.values())


def test_jsonl_holds_every_record_with_nan_as_null(tmp_path):
    logger = MetricLogger(str(tmp_path), _cfg(), {}, None)
    logger.log({"step": 1, "loss/train": 2.5})
    logger.log({"step": 2, "loss/train": float("nan")})
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss/train": 2.5}, {"step": 2, "loss/train": None}]


def test_resume_drops_the_records_after_the_checkpoint_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss/train": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    MetricLogger(str(tmp_path), _cfg(), {}, resume_step=2).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    MetricLogger(str(tmp_path), _cfg(), {}, resume_step=None).close()  # a fresh run starts the file anew
    assert path.read_text() == ""


def test_losses_are_also_logged_against_flops(tmp_path, monkeypatch):
    logged = []
    run = types.SimpleNamespace(define_metric=lambda *a, **k: None, log=lambda data, step: logged.append(data),
                                finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: run))
    logger = MetricLogger(str(tmp_path), _cfg("offline"), {}, None)
    logger.log({"step": 1, "tokens": 8, "flops": 1e9, "loss/train": 2.0})
    assert logged[0][f"{FLOPS_AXIS}/train"] == 2.0 and logged[0]["loss/train"] == 2.0


def test_wandb_mode_env_wins_and_children_get_no_wandb_service(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("offline") == "disabled"
    monkeypatch.setenv("WANDB_SERVICE", "2-123-tcp-localhost-4567")
    env = training_env({"EXTRA": "1"})
    assert "WANDB_SERVICE" not in env and env["EXTRA"] == "1"
