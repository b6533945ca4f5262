"""Tests for moe.analysis.compare (`moe compare`): synthetic run folders in tmp_path, no training.
Reading one run folder is tested in test_runs.py, the figures in test_plots.py."""
from __future__ import annotations

import json

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
from tests.helpers import PNG_MAGIC, assert_png, table_rows, write_run


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


def test_runs_without_evals_are_left_out_of_the_common_budget(tmp_path):
    evals = write_run(tmp_path, "evals", steps=20)
    no_evals = write_run(tmp_path, "no-evals", steps=30, eval_every=1000)
    table = compare_runs([str(evals), str(no_evals)], str(tmp_path / "out"))
    rows = table_rows(table)
    col = "val loss at 81.9K tokens"
    assert col in rows["__header__"]
    assert rows["no-evals"][col] == "-" and rows["evals"][col].startswith("**")
    assert "Runs without a finite eval point in metrics.jsonl are left out: no-evals." in table


def test_no_evals_anywhere_no_common_budget_column(tmp_path):
    a = write_run(tmp_path, "a", steps=20, eval_every=1000, summary_drop=("val_loss",))
    b = write_run(tmp_path, "b", steps=30, eval_every=1000, summary_drop=("val_loss",))
    table = compare_runs([str(a), str(b)], str(tmp_path / "out"))
    assert "cannot be compared at a common token count" in table
    assert len(table_rows(table)["__header__"]) == 12
    assert "**Bold**" not in table  # no val loss anywhere: nothing is bold
    assert table.endswith('- "-": not recorded by the run.\n')


def test_markdown_lists_runs_plots_and_moe_runs_without_loads(tmp_path):
    loads = write_run(tmp_path, "loads", model_type="moe", moe_layers=(0,))
    no_loads = write_run(tmp_path, "no-loads", model_type="moe")
    running = write_run(tmp_path, "running", summary_extra={"status": "running"})
    out = tmp_path / "out"
    table = compare_runs([str(loads), str(no_loads), str(running)], str(out))
    md = (out / "compare.md").read_text()
    assert md.startswith("# Run comparison\n\nRuns, in the order given:\n\n")
    assert f"- **loads**: `{loads}`" in md and f"- **running**: `{running}`" in md
    assert "### [Validation loss vs tokens](val_loss_vs_tokens.png)" in md
    assert "![Expert load per MoE layer](expert_load.png)" in md
    assert "MoE runs without router load lines in metrics.jsonl (not shown): no-loads." in md
    assert "running (running)" in table_rows(table)  # an unfinished status is shown with the name
    assert "## Warnings" not in md
    assert_png(out / EXPERT_LOAD_FILE)


def test_same_name_same_folder_numbered(tmp_path):
    a = write_run(tmp_path, "a", name="same")
    table = compare_runs([str(a), str(a)], str(tmp_path / "out"))
    rows = [k for k in table_rows(table) if k != "__header__"]
    assert rows == [f"same ({a})", f"same ({a}) #2"]


def test_output_folder_that_cannot_be_created(two_runs, tmp_path):
    dense, _ = two_runs
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ReportError, match="cannot create output folder"):
        compare_runs([str(dense)], str(blocker / "out"))
    with pytest.raises(ReportError, match="no run folders given"):
        compare_runs([], str(tmp_path / "out"))
