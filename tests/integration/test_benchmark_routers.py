"""benchmarks/routers.py: the table helpers, and one tiny end-to-end invocation."""
import json

import pytest

from benchmarks import routers as bench


def test_tail_mean_over_layers_and_last_windows():
    lines = [{"step": s, "router/layer0/max_over_mean": float(s), "router/layer2/max_over_mean": float(s) + 1}
             for s in range(1, 9)]
    lines.insert(3, {"step": 4, "loss/val": 1.0})
    assert bench.tail_mean(lines, "max_over_mean", fraction=0.25) == pytest.approx((7 + 8 + 8 + 9) / 4)
    assert bench.tail_mean(lines, "dropped_frac") is None


def test_every_family_has_a_config_and_the_table_formats():
    import os

    for family, _ in bench.FAMILIES:
        assert os.path.isfile(os.path.join(bench.CONFIG_DIR, f"{family}.yaml")), family
    text = bench.table([{"family": "topk", "val_loss": 3.0, "load_max_over_mean": 1.5, "dropped_frac": None,
                         "tokens_per_s": 12345.6}])
    assert "| topk | top-2 softmax + Switch aux loss | 3.0000 | 1.500 | - | 12,346 |" in text


@pytest.mark.slow
def test_runs_families_and_writes_json(tmp_path, data_cache):
    out = tmp_path / "bench.json"
    rows = bench.main(["--steps", "2", "--only", "hash,expert_choice", "--root", str(tmp_path / "runs"),
                       "--data-cache", data_cache, "--json", str(out), "train.eval_batches=1"])
    assert [r["family"] for r in rows] == ["hash", "expert_choice"]
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python -m benchmarks.routers --steps 2") and len(saved["rows"]) == 2
    for r in rows:
        assert r["steps"] == 2 and r["val_loss"] > 0 and r["tokens_per_s"] > 0
    assert rows[1]["load_max_over_mean"] == pytest.approx(1.0)  # expert choice: balanced by construction
