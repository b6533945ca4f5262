"""Tests for moe.analysis.sweep_report (`moe report`) on synthetic sweep folders, no training. The
end-to-end tests (a real `moe sweep`, then `moe report`) are in tests/integration/test_sweep.py."""
from __future__ import annotations

import json

import pytest

from moe.analysis.runs import ReportError
from moe.analysis.sweep_report import build_report, collect, summarise
from tests.helpers import assert_png, table_rows, write_run, write_sweep

K = "model.moe.top_k"


@pytest.fixture
def sweep(tmp_path):
    """top_k=1: two finished seeds; top_k=2: one finished, one failed before writing anything;
    top_k=4: finished though sweep.json has no status; top_k=8: still running; top_k=16: an empty folder."""
    entries = [("k1s0", {K: 1, "run.seed": 0}, "finished"), ("k1s1", {K: 1, "run.seed": 1}, "finished"),
               ("k2s0", {K: 2, "run.seed": 0}, "finished"), ("k2s1", {K: 2, "run.seed": 1}, "failed"),
               ("k4s0", {K: 4, "run.seed": 0}, None), ("k8s0", {K: 8, "run.seed": 0}, "running"),
               ("k16s0", {K: 16, "run.seed": 0}, None)]
    d = write_sweep(tmp_path, "grid", entries, swept_keys=[K, "run.seed"])
    for name, loss0 in (("k1s0", 5.0), ("k1s1", 5.2), ("k2s0", 4.8), ("k4s0", 5.5)):
        write_run(d, name, model_type="moe", moe_layers=(1,), loss0=loss0)
    write_run(d, "k8s0", model_type="moe", moe_layers=(1,), summary_extra={"status": "running"})
    (d / "k16s0").mkdir()
    return d


def test_collect_groups_by_swept_values_without_the_seed(sweep):
    groups, swept = collect([str(sweep)])
    assert swept == [K]
    assert [g.label for g in groups] == ["top_k=1", "top_k=2", "top_k=4", "top_k=8", "top_k=16"]
    assert [g.values for g in groups][:2] == [{K: 1}, {K: 2}]
    status = {m.name: m.status for g in groups for m in g.members}
    assert status == {"k1s0": "finished", "k1s1": "finished", "k2s0": "finished", "k2s1": "failed",
                      "k4s0": "finished", "k8s0": "running", "k16s0": "not run"}
    members = {m.name: m for g in groups for m in g.members}
    assert members["k1s1"].values == {K: 1, "run.seed": 1} and members["k1s1"].path == str(sweep / "k1s1")
    assert members["k16s0"].record is None and members["k8s0"].record is not None
    assert [m.name for m in groups[3].finished] == [] and len(groups[0].finished_records()) == 2


def test_summarise_averages_finished_seeds(sweep):
    groups, _ = collect([str(sweep)])
    row = summarise(groups[0])
    recs = groups[0].finished_records()
    losses = [r.stats["val_loss"] for r in recs]
    assert row["variant"] == "top_k=1" and row[K] == 1 and (row["runs"], row["finished"]) == (2, 2)
    assert row["val_loss"] == pytest.approx(sum(losses) / 2)
    assert row["val_loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / 2 ** 0.5)
    assert row["train_loss_std"] == 0.0 and row["params_active"] == 45_600_000 and row["tokens"] == 163_840
    assert row["load_max_over_mean"] == pytest.approx(
        sum(r.train[-1]["router/layer1/max_over_mean"] for r in recs) / 2)
    assert row["dropped_frac"] == 0.0 and row["failed"] == []
    row = summarise(groups[1])
    assert (row["finished"], row["val_loss_std"]) == (1, 0.0) and row["failed"] == [("k2s1", "failed")]
    row = summarise(groups[4])
    assert row["val_loss"] is None and row["params_total"] is None and row["load_max_over_mean"] is None


def test_build_report_writes_markdown_json_and_plots(sweep, tmp_path):
    out = tmp_path / "rep"
    text = build_report([str(sweep)], str(out))
    assert (out / "report.md").read_text() == text
    assert text.startswith(f"# Sweep report\n\nSources: `{sweep}`\n\n| variant | seeds | val loss (mean ± std) |")
    rows = table_rows(text)
    assert rows["top_k=1"]["seeds"] == "2/2" and rows["top_k=2"]["seeds"] == "1/2"
    assert rows["top_k=16"]["val loss (mean ± std)"] == "-" and rows["top_k=16"]["seeds"] == "0/1"
    assert rows["top_k=2"]["val loss (mean ± std)"].startswith("**")  # lowest loss0: best
    assert rows["top_k=2"]["val loss (mean ± std)"].endswith(" ± 0.0000**")
    assert rows["top_k=1"]["params active"] == "45.6M" and rows["top_k=1"]["tokens/s"] == "51.2K"
    assert rows["top_k=1"]["dropped"] == "0.000"
    assert "## Failed or unfinished runs" in text
    assert "- `k2s1` (top_k=2): failed; its log is in the sweep folder (`k2s1.log`" in text
    assert "- `k8s0` (top_k=8): running;" in text and "- `k16s0` (top_k=16): not run;" in text
    pngs = ["expert_load.png", "final_val_loss_by_top_k.png", "load_balance.png", "tokens_per_s.png",
            "val_loss_vs_flops.png", "val_loss_vs_tokens.png"]
    assert sorted(p.name for p in out.glob("*.png")) == pngs
    for fname in pngs:
        assert_png(out / fname)
        assert f"![{fname}]({fname})" in text
    assert text.split("## Plots")[1].index("expert_load") < text.split("## Plots")[1].index("val_loss_vs_tokens")
    report = json.loads((out / "report.json").read_text())
    groups, _ = collect([str(sweep)])
    assert report == json.loads(json.dumps([summarise(g) for g in groups]))


def test_plain_run_folders_are_their_own_groups(tmp_path):
    a = write_run(tmp_path, "dense-a", loss0=5.0)
    b = write_run(tmp_path, "dense-b", name="b | wide", summary_extra={"status": "failed"})
    out = tmp_path / "rep"
    text = build_report([str(a), str(b)], str(out))
    assert table_rows(text)["dense-a"]["seeds"] == "1/1"
    assert "\n| b \\| wide | 0/1 | - |" in text  # the pipe in the name is escaped in the table
    assert "- `b | wide` (b | wide): failed;" in text
    assert not (out / "expert_load.png").exists()  # no MoE run
    assert not any(p.name.startswith("final_val_loss_by") for p in out.glob("*.png"))  # nothing swept


def test_sweep_and_run_folders_together(sweep, tmp_path):
    extra = write_run(tmp_path, "extra", model_type="moe", moe_layers=(0,))
    groups, swept = collect([str(sweep), str(extra)])
    assert groups[-1].label == "extra" and groups[-1].values == {} and swept == [K]


def test_not_a_run_folder_and_empty_sweep(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="empty: not a run folder"):
        build_report([str(tmp_path / "empty")], str(tmp_path / "rep"))
    assert not (tmp_path / "rep").exists()
    d = write_sweep(tmp_path, "nothing", [], swept_keys=[])
    with pytest.raises(ReportError, match=f"no runs found in {d}"):
        build_report([str(d)], str(tmp_path / "rep"))
