"""Tests for moe.analysis.compare (`moe compare`): synthetic run folders in tmp_path, no training."""
from __future__ import annotations

import json
import math
import os
import zlib

import numpy as np
import pytest

from moe.analysis.compare import (
    EXPERT_LOAD_FILE,
    PLOT_FILES,
    ReportError,
    ReportWarning,
    compare_runs,
    load_run,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(root, dirname, *, name=None, model_type="dense", steps=40, tokens_per_step=4096,
              flops_per_token=6e8, eval_every=10, moe_layers=(), num_experts=4, loss0=6.0,
              summary=True, summary_drop=(), summary_extra=None, truncate_last=False):
    """A run folder like the trainer writes: summary.json + metrics.jsonl (+ config.yaml)."""
    d = root / dirname
    d.mkdir()
    (d / "config.yaml").write_text("model:\n  n_layers: 4\n")
    rng = np.random.default_rng(zlib.crc32(dirname.encode()))
    lines = []
    for step in range(1, steps + 1):
        tokens = step * tokens_per_step
        flops = tokens * flops_per_token
        loss = loss0 * math.exp(-step / steps) + 0.05 * rng.standard_normal()
        line = {"step": step, "tokens": tokens, "flops": flops, "loss/train": loss,
                "lr": 1e-3, "grad_norm": 1.0, "speed/tokens_per_s": 50_000 + 100 * step,
                "speed/mfu": 0.4}
        for layer in moe_layers:
            load = rng.dirichlet(np.ones(num_experts) * 5).tolist()
            line[f"router/layer{layer}/load"] = load
            line[f"router/layer{layer}/max_over_mean"] = max(load) * num_experts
            line[f"router/layer{layer}/dropped_frac"] = 0.0
            line[f"router/layer{layer}/entropy"] = 1.3
            line[f"router/layer{layer}/aux_loss"] = 0.01
            line[f"router/layer{layer}/z_loss"] = 0.001
        lines.append(json.dumps(line))
        if step % eval_every == 0:
            val = loss0 * math.exp(-step / steps) + 0.1
            lines.append(json.dumps({"step": step, "tokens": tokens, "flops": flops,
                                     "loss/val": val, "ppl/val": math.exp(val)}))
    text = "\n".join(lines) + "\n"
    if truncate_last:
        text += json.dumps({"step": steps + 1, "tokens": 1, "flops": 1.0, "loss/train": 1.0})[:17]
    (d / "metrics.jsonl").write_text(text)
    final_val = loss0 * math.exp(-1) + 0.1
    info = {
        "name": name or dirname, "model_type": model_type, "train_loss": 2.3456,
        "val_loss": round(final_val, 4), "val_ppl": round(math.exp(final_val), 2),
        "tokens": steps * tokens_per_step, "steps": steps, "params_total": 123_456_789,
        "params_active": 45_600_000 if model_type == "moe" else 123_456_789,
        "flops_per_token": flops_per_token, "tokens_per_s": 51_234.0, "wall_s": 3725.0,
        "status": "finished",
    }
    info.update(summary_extra or {})
    for key in summary_drop:
        info.pop(key, None)
    if summary:
        (d / "summary.json").write_text(json.dumps(info))
    return d


def table_rows(md: str) -> dict:
    """{run cell: [cells]} for the first markdown table in md."""
    rows = [l for l in md.splitlines() if l.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    out = {"__header__": header}
    for r in rows[1:]:
        cells = [c.strip() for c in r.strip("|").split("|")]
        out[cells[0]] = dict(zip(header, cells))
    return out


def assert_png(path):
    assert os.path.isfile(path), path
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC, path
    assert 5_000 < len(data) < 1_000_000, (path, len(data))


@pytest.fixture
def two_runs(tmp_path):
    dense = write_run(tmp_path, "dense-124m", loss0=6.0)
    moe = write_run(tmp_path, "moe-8x", model_type="moe", moe_layers=(1, 3), loss0=5.5,
                    flops_per_token=2.5e8)
    return dense, moe


def test_compare_writes_plots_and_table(two_runs, tmp_path):
    dense, moe = two_runs
    out = tmp_path / "out" / "nested"  # created if missing
    table = compare_runs([str(dense), str(moe)], str(out))

    for fname in PLOT_FILES + (EXPERT_LOAD_FILE,):
        assert_png(out / fname)
    md = (out / "compare.md").read_text()
    for fname in PLOT_FILES + (EXPERT_LOAD_FILE,):
        assert f"({fname})" in md
    assert table.strip() and table.splitlines()[0] in md

    rows = table_rows(table)
    assert rows["__header__"][:12] == [
        "run", "type", "params total", "params active", "FLOPs/token (training)", "tokens",
        "steps", "final train loss", "final val loss", "val ppl", "tokens/s", "wall time"]
    assert list(rows)[1:] == ["dense-124m", "moe-8x"]  # order given
    d, m = rows["dense-124m"], rows["moe-8x"]
    assert (d["type"], m["type"]) == ("dense", "moe")
    assert d["params total"] == "123M" and m["params active"] == "45.6M"
    assert d["FLOPs/token (training)"] == "6.00e8" and m["FLOPs/token (training)"] == "2.50e8"
    assert d["tokens"] == "164K" and d["steps"] == "40"
    assert d["final train loss"] == "2.3456"
    assert d["tokens/s"] == "51.2K" and d["wall time"] == "1h 02m"
    s_dense = json.loads((dense / "summary.json").read_text())
    s_moe = json.loads((moe / "summary.json").read_text())
    assert d["val ppl"] == f"{s_dense['val_ppl']:.2f}"
    # MoE has the lower val loss -> bold; dense is not.
    assert m["final val loss"] == f"**{s_moe['val_loss']:.4f}**"
    assert d["final val loss"] == f"{s_dense['val_loss']:.4f}"
    assert "same number of tokens (163,840)" in table
    assert "different token counts" not in table
    assert "expert_load.png not written" not in md


def test_moe_run_layers_and_expert_load(two_runs):
    _, moe = two_runs
    run = load_run(str(moe))
    assert run.is_moe and run.moe_layers() == [1, 3]
    steps, load = run.expert_load(3)
    assert load.shape == (40, 4) and steps[0] == 1 and steps[-1] == 40
    np.testing.assert_allclose(load.sum(axis=1), 1.0, atol=1e-9)
    assert len(run.evals) == 4 and len(run.train) == 40


def test_different_token_counts_interpolated_column(tmp_path):
    # Short run: evals at 10,20 steps of 4096 tokens -> reaches 81,920 tokens.
    short = write_run(tmp_path, "short", steps=20, loss0=5.0)
    # Long run with another batch size: evals every 10 steps of 3000 tokens (30K, 60K, 90K, 120K).
    long = write_run(tmp_path, "long", steps=40, tokens_per_step=3000, loss0=6.0)
    table = compare_runs([str(short), str(long)], str(tmp_path / "out"))
    assert "val loss compared at different token counts" in table
    assert "interpolated linearly" in table
    rows = table_rows(table)
    col = "val loss at 81.9K tokens"
    assert col in rows["__header__"]
    # Expected: linear interpolation of long's eval curve at 81,920 tokens.
    ev = load_run(str(long)).evals
    x = [e["tokens"] for e in ev]
    y = [e["loss/val"] for e in ev]
    expected = float(np.interp(81_920, x, y))
    short_at = load_run(str(short)).evals[-1]["loss/val"]
    cells = {rows["short"][col].strip("*"), rows["long"][col].strip("*")}
    assert cells == {f"{expected:.4f}", f"{short_at:.4f}"}
    best = "short" if short_at < expected else "long"
    assert rows[best][col].startswith("**")


def test_not_a_run_folder_raises_naming_it(two_runs, tmp_path):
    dense, _ = two_runs
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(ReportError, match="not-a-run") as info:
        compare_runs([str(dense), str(empty)], str(tmp_path / "out"))
    assert "summary.json" in str(info.value) and "metrics.jsonl" in str(info.value)
    assert not (tmp_path / "out").exists()  # fails before writing anything
    with pytest.raises(ReportError, match="does-not-exist"):
        load_run(str(tmp_path / "does-not-exist"))
    assert isinstance(info.value, ValueError)


def test_truncated_last_metrics_line_is_skipped(tmp_path):
    run_dir = write_run(tmp_path, "crashed", truncate_last=True)
    with pytest.warns(ReportWarning, match="truncated last line"):
        run = load_run(str(run_dir))
    assert len(run.train) == 40 and run.train[-1]["step"] == 40
    with pytest.warns(ReportWarning):
        compare_runs([str(run_dir)], str(tmp_path / "out"))
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "truncated last line" in md  # listed under Warnings
    assert_png(tmp_path / "out" / "train_loss_vs_tokens.png")


def test_missing_summary_keys_show_dash(tmp_path):
    ok = write_run(tmp_path, "ok")
    died = write_run(tmp_path, "died", summary_drop=("params_total", "params_active", "wall_s",
                                                     "val_ppl", "status"))
    # No eval lines, no summary val loss: val loss columns must be "-" (and not bold).
    (died / "metrics.jsonl").write_text(
        "\n".join(l for l in (died / "metrics.jsonl").read_text().splitlines()
                  if "loss/val" not in l) + "\n")
    s = json.loads((died / "summary.json").read_text())
    s.pop("val_loss")
    (died / "summary.json").write_text(json.dumps(s))

    table = compare_runs([str(ok), str(died)], str(tmp_path / "out"))
    r = table_rows(table)["died"]
    for col in ("params total", "params active", "final val loss", "val ppl", "wall time"):
        assert r[col] == "-", col
    assert r["final train loss"] == "2.3456"
    assert table_rows(table)["ok"]["final val loss"].startswith("**")


def test_metrics_only_run_fills_from_metrics(tmp_path):
    run_dir = write_run(tmp_path, "no-summary", model_type="moe", moe_layers=(0,), summary=False)
    run = load_run(str(run_dir))
    assert run.name == "no-summary" and run.is_moe
    assert run.stats["tokens"] == 40 * 4096 and run.stats["steps"] == 40
    assert run.stats["flops_per_token"] == pytest.approx(6e8)
    assert run.stats["params_total"] is None
    table = compare_runs([str(run_dir)], str(tmp_path / "out"))
    r = table_rows(table)["no-summary"]
    assert r["tokens"] == "164K\u2020" and r["params total"] == "-"
    assert r["final val loss"] == f"{run.evals[-1]['loss/val']:.4f}\u2020"


def test_all_dense_skips_expert_load(tmp_path):
    a = write_run(tmp_path, "dense-a")
    b = write_run(tmp_path, "dense-b", name="dense b | wide", loss0=5.0)
    out = tmp_path / "out"
    out.mkdir()
    (out / EXPERT_LOAD_FILE).write_bytes(PNG_MAGIC)  # stale from an earlier comparison
    table = compare_runs([str(a), str(b)], str(out))
    for fname in PLOT_FILES:
        assert_png(out / fname)
    assert not (out / EXPERT_LOAD_FILE).exists()
    md = (out / "compare.md").read_text()
    assert "expert_load.png not written: no run is MoE" in md
    assert "dense b \\| wide" in table  # pipes in names do not break the table
    assert len(table_rows(table)["__header__"]) == 12


def test_duplicate_names_are_disambiguated(tmp_path):
    a = write_run(tmp_path, "a", name="same")
    b = write_run(tmp_path, "b", name="same")
    table = compare_runs([str(a), str(b)], str(tmp_path / "out"))
    rows = [k for k in table_rows(table) if k != "__header__"]
    assert len(rows) == 2 and rows[0] != rows[1]


def test_summary_only_and_nan_runs(tmp_path):
    s_only = tmp_path / "s-only"
    s_only.mkdir()
    (s_only / "summary.json").write_text(json.dumps(
        {"name": "s-only", "model_type": "moe", "val_loss": 3.1, "tokens": 1000,
         "status": "failed"}))
    diverged = tmp_path / "diverged"
    diverged.mkdir()
    (diverged / "metrics.jsonl").write_text(
        '{"step": 1, "tokens": 10, "flops": 1e3, "loss/train": NaN}\n'
        '{"step": 1, "tokens": 10, "flops": 1e3, "loss/val": NaN, "ppl/val": NaN}\n'
        '{"step": 2, "tokens": 20, "flops": 2e3, "loss/train": 5.0}\n')
    out = tmp_path / "out"
    table = compare_runs([str(s_only), str(diverged)], str(out))
    rows = table_rows(table)
    assert rows["s-only (failed)"]["final val loss"] == "**3.1000**"  # NaN never wins
    assert rows["diverged"]["final val loss"] == "nan\u2020"
    assert rows["s-only (failed)"]["params total"] == "-"
    for fname in PLOT_FILES:
        assert_png(out / fname)
    # MoE by summary but no router loads logged: no heatmap, and the markdown says why.
    assert not (out / EXPERT_LOAD_FILE).exists()
    assert "logged no router load lines" in (out / "compare.md").read_text()
