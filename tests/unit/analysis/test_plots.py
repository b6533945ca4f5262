"""Tests for moe.analysis.plots: the figures of `moe compare` and `moe report` (synthetic runs). Most
tests catch the figure instead of saving it and look at what was drawn."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from moe.analysis import plots
from moe.analysis.runs import load_run
from tests.helpers import assert_png, write_run


@pytest.fixture
def figures(monkeypatch):
    """{file name: figure} of what the plot functions would have saved."""
    saved = {}
    monkeypatch.setattr(plots, "save", lambda fig, path: saved.__setitem__(path, fig))
    return saved


@pytest.fixture
def runs(tmp_path):
    dense = load_run(str(write_run(tmp_path, "dense")))
    moe = load_run(str(write_run(tmp_path, "moe", model_type="moe", moe_layers=(0, 1), steps=10, eval_every=5)))
    return [dense, moe]


def only_axes(fig):
    (ax,) = [a for a in fig.axes if a.get_visible()]
    return ax


def test_use_agg_backend_and_colors():
    import matplotlib

    plots.use_agg_backend()
    if "matplotlib.pyplot" not in sys.modules:
        assert matplotlib.get_backend().lower() == "agg"
    assert len(plots.colors(3)) == 3 and len(set(plots.colors(10))) == 10
    assert len(set(plots.colors(12))) == 12 and len(plots.colors(25)) == 25  # tab20, repeating beyond 20


def test_ema_is_bias_corrected_and_skips_non_finite():
    np.testing.assert_allclose(plots.ema(np.full(5, 2.0), 0.9), 2.0)
    out = plots.ema(np.array([math.nan, 1.0, math.inf, 3.0]), 0.5)
    assert math.isnan(out[0]) and out[1] == 1.0 and out[2] == 1.0
    assert out[3] == pytest.approx((0.25 * 1.0 + 0.5 * 3.0) / 0.75)


def test_compare_figures_are_written(runs, tmp_path):
    names, colors = ["dense", "moe"], plots.colors(2)
    plots.plot_val_loss(runs, names, colors, str(tmp_path / plots.VAL_LOSS_VS_TOKENS), "tokens", 40960.0)
    plots.plot_val_loss(runs, names, colors, str(tmp_path / plots.VAL_LOSS_VS_FLOPS), "flops", None)
    plots.plot_train_loss(runs, names, colors, str(tmp_path / plots.TRAIN_LOSS_VS_TOKENS))
    plots.plot_throughput(runs, names, colors, str(tmp_path / plots.TOKENS_PER_S))
    plots.plot_expert_load([("moe", runs[1], runs[1].moe_layers())], str(tmp_path / plots.EXPERT_LOAD_FILE))
    for fname in (plots.VAL_LOSS_VS_TOKENS, plots.VAL_LOSS_VS_FLOPS, plots.TRAIN_LOSS_VS_TOKENS,
                  plots.TOKENS_PER_S, plots.EXPERT_LOAD_FILE):
        assert_png(tmp_path / fname)


def test_val_loss_lines_and_common_budget(runs, figures):
    plots.plot_val_loss(runs, ["dense", "moe"], plots.colors(2), "v.png", "tokens", 20480.0)
    ax = only_axes(figures["v.png"])
    assert ax.get_title() == "Validation loss vs training tokens"
    labels = [l.get_label() for l in ax.get_lines()]
    assert labels == ["dense", "moe", "common budget (20.5K tokens)"]
    assert len(ax.get_lines()[0].get_xdata()) == 4 and len(ax.get_lines()[1].get_xdata()) == 2
    plots.plot_val_loss(runs, ["dense", "moe"], plots.colors(2), "f.png", "flops", None)
    ax = only_axes(figures["f.png"])
    assert ax.get_xscale() == "log" and ax.get_title() == "Validation loss vs training compute"


def test_no_data_says_so(tmp_path, figures):
    d = tmp_path / "empty-metrics"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"name": "s", "tokens_per_s": 1000.0}))
    run = load_run(str(d))
    plots.plot_val_loss([run], ["s"], plots.colors(1), "v.png", "tokens", None)
    plots.plot_train_loss([run], ["s"], plots.colors(1), "t.png")
    plots.plot_throughput([run], ["s"], plots.colors(1), "s.png")
    texts = {p: [t.get_text() for t in only_axes(f).texts] for p, f in figures.items()}
    assert texts["v.png"] == ["no eval (loss/val) lines logged by any run"]
    assert texts["t.png"] == ["no train (loss/train) lines logged by any run"]
    # no per-step speed, but the summary's average: a flat dashed line
    ax = only_axes(figures["s.png"])
    assert texts["s.png"] == [] and [l.get_label() for l in ax.get_lines()] == ["s (summary average)"]


def test_train_loss_smoothed_from_20_points(runs, figures):
    plots.plot_train_loss(runs, ["dense", "moe"], plots.colors(2), "t.png")
    ax = only_axes(figures["t.png"])
    assert ax.get_title() == "Training loss vs tokens (EMA 0.9; raw values faint)"
    # dense (40 points): a faint raw line and the labelled EMA; moe (10 points): raw with markers
    assert [l.get_label() for l in ax.get_lines()][1:] == ["dense", "moe"]
    plots.plot_train_loss(runs[1:], ["moe"], plots.colors(1), "t2.png")
    assert only_axes(figures["t2.png"]).get_title() == "Training loss vs tokens"


def test_expert_load_panels_wrap_at_four(tmp_path, figures):
    wide = load_run(str(write_run(tmp_path, "wide", model_type="moe", moe_layers=(0, 1, 2, 3, 4), steps=6)))
    one = load_run(str(write_run(tmp_path, "one", model_type="moe", moe_layers=(2,), num_experts=8, steps=6)))
    plots.plot_expert_load([("wide", wide, wide.moe_layers()), ("one", one, one.moe_layers())], "e.png")
    fig = figures["e.png"]
    panels = [a for a in fig.axes if a.get_visible() and a.get_title()]
    assert [a.get_title() for a in panels] == [f"wide \u2014 layer {i}" for i in range(5)] + ["one \u2014 layer 2"]
    colorbars = [a for a in fig.axes if a.get_visible() and not a.get_title()]
    assert len(colorbars) == 2
    assert "uniform = 1/8 = 0.125" in colorbars[1].get_ylabel()
    assert len(panels[-1].get_yticks()) == 8


def test_sweep_figures(runs, tmp_path, figures):
    groups = [("dense", runs[:1]), ("moe", [runs[1], runs[1]])]
    plots.plot_group_curves(groups, plots.colors(2), "c.png", "eval", "loss/val", "tokens", "val loss", "t")
    ax = only_axes(figures["c.png"])
    assert [l.get_label() for l in ax.get_lines()] == ["dense", "moe"]
    assert len(ax.collections) == 1  # the ±std band of the group with two runs
    plots.plot_group_curves(groups, plots.colors(2), "l.png", "eval", "loss/val", "flops", "val loss", "t",
                            logx=True)
    assert only_axes(figures["l.png"]).get_xscale() == "log"

    plots.plot_load_balance(groups, plots.colors(2), "b.png")
    lines = only_axes(figures["b.png"]).get_lines()
    assert [l.get_alpha() for l in lines[:2]] == [0.9, 0.4]  # the group's first run opaque, the others faint
    assert lines[0].get_label() == "moe" and lines[1].get_label().startswith("_")  # one legend entry

    rows = [{"variant": "k=1", "top_k": 1, "val_loss": 2.0, "val_loss_std": 0.1},
            {"variant": "k=2", "top_k": 2, "val_loss": None, "val_loss_std": None},
            {"variant": "k=1b", "top_k": 1, "val_loss": 1.9, "val_loss_std": 0.0}]
    plots.plot_final_val_loss_by(rows, "top_k", str(tmp_path / "by.png"))
    ax = only_axes(figures[str(tmp_path / "by.png")])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2"]
    assert [t.get_text() for t in ax.texts] == ["k=1", "k=2", "k=1b"]
    assert ax.get_title() == "final val loss by top_k"
