"""moe/analysis/downstream.py: the `downstream/<task>/<metric>` lines of run folders in `moe compare`'s
and `moe report`'s tables and plots (synthetic run folders, no training)."""
from __future__ import annotations

import json

import pytest

from moe.analysis import downstream
from moe.analysis.compare import compare_runs
from moe.analysis.runs import load_run
from moe.analysis.sweep_report import build_report
from tests.helpers import assert_png, table_rows, write_run


def _with_tasks(run, acc_at, ppl=None):
    """Add downstream metrics to a synthetic run's evaluation lines: acc = acc_at(step)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        if "loss/val" in line:
            line["downstream/tiny_mc/acc"] = acc_at(line["step"])
            if ppl is not None:
                line["downstream/tiny_text/byte_perplexity"] = ppl
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


@pytest.fixture
def runs(tmp_path):
    a = _with_tasks(write_run(tmp_path, "dense", steps=40), lambda s: s / 100, ppl=3.5)
    b = _with_tasks(write_run(tmp_path, "moe", model_type="moe", moe_layers=(1,), steps=40), lambda s: s / 50)
    plain = write_run(tmp_path, "plain", steps=40)
    return a, b, plain


def test_compare_tabulates_the_last_values_and_plots_them(runs, tmp_path):
    out = tmp_path / "cmp"
    text = compare_runs([str(r) for r in runs[:2]], str(out))
    tasks = text[text.index("Downstream tasks"):]
    rows = table_rows(tasks[tasks.index("|"):])
    assert rows["__header__"] == ["run", "tiny_mc acc", "tiny_text byte_perplexity"]
    assert rows["dense"]["tiny_mc acc"] == "0.4" and rows["moe"]["tiny_mc acc"] == "0.8"  # step 40: 40/100, 40/50
    assert rows["dense"]["tiny_text byte_perplexity"] == "3.5" and rows["moe"]["tiny_text byte_perplexity"] == "-"
    md = (out / "compare.md").read_text()
    assert "## Downstream tasks" in md and "downstream_vs_tokens.png" in md
    for png in downstream.PLOT_FILES:
        assert_png(out / png)


def test_without_downstream_lines_no_table_and_stale_plots_removed(runs, tmp_path):
    plain = [("plain", [load_run(str(runs[2]))])]
    assert downstream.table(plain, downstream.metric_keys(plain[0][1])) == ""
    assert downstream.markdown_section("") == []
    for png in downstream.PLOT_FILES:
        (tmp_path / png).write_bytes(b"stale")
    assert downstream.write_plots(plain, str(tmp_path)) == []
    assert not any((tmp_path / png).exists() for png in downstream.PLOT_FILES)


def test_series_against_tokens_and_flops(runs):
    rec = load_run(str(runs[0]))
    xs, ys = rec.series("eval", "downstream/tiny_mc/acc", "flops")
    assert list(ys) == [0.1, 0.2, 0.3, 0.4] and xs[-1] == 40 * 4096 * 6e8
    assert downstream.metric_keys([rec]) == ["downstream/tiny_mc/acc", "downstream/tiny_text/byte_perplexity"]
    assert downstream.last_value(rec, "downstream/tiny_mc/acc") == 0.4


def test_report_tabulates_and_plots_them(runs, tmp_path):
    out = tmp_path / "rep"
    text = build_report([str(runs[1])], str(out))
    tasks = text[text.index("## Downstream tasks"):]
    rows = table_rows(tasks[tasks.index("|"):])
    assert rows["__header__"] == ["variant", "tiny_mc acc"] and rows["moe"]["tiny_mc acc"] == "0.8"
    assert json.loads((out / "report.json").read_text())[0]["downstream"] == {"downstream/tiny_mc/acc": 0.8}
    for png in downstream.PLOT_FILES:
        assert_png(out / png)


def test_seeds_are_averaged(tmp_path):
    seeds = [load_run(str(_with_tasks(write_run(tmp_path, f"seed{i}"), lambda s, i=i: 0.5 + 0.2 * i))) for i in (0, 1)]
    assert downstream.mean_last(seeds, "downstream/tiny_mc/acc") == pytest.approx(0.6)
    assert downstream.row_values(seeds) == {"downstream/tiny_mc/acc": pytest.approx(0.6)}
    assert downstream.mean_last(seeds, "downstream/other/acc") is None
