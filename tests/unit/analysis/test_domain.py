"""moe/analysis/domain.py: `moe compare` and `moe report` show per-source val loss and routing by domain
of runs on a data mixture, and nothing for other runs."""
from __future__ import annotations

import json
import os

from moe.analysis import domain
from moe.analysis.compare import compare_runs
from moe.analysis.runs import load_run
from tests.helpers import assert_png, write_run


def _mixture_run(root, name, spec0):
    write_run(root, name, model_type="moe", moe_layers=(0, 1), steps=20, eval_every=10)
    with open(root / name / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 21, "tokens": 1, "flops": 1.0, "loss/train": 1.0,
                            "router/domain_sources": ["code", "docs"],
                            "router/layer0/domain": [[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]],
                            "router/layer0/specialisation": spec0,
                            "router/layer1/domain": [[0.25] * 4, [0.25] * 4],
                            "router/layer1/specialisation": 0.0}) + "\n")
        f.write(json.dumps({"step": 21, "tokens": 1, "flops": 1.0, "loss/val": 2.0, "loss/val/code": 1.5,
                            "loss/val/docs": 2.5}) + "\n")
    return str(root / name)


def test_table_and_plot_of_mixture_runs(tmp_path):
    a = load_run(_mixture_run(tmp_path, "a", 0.25))
    b = load_run(_mixture_run(tmp_path, "b", 0.5))
    md = domain.table([("a", [a]), ("ab", [a, b])])
    assert "| run | val loss code | val loss docs | specialisation L0 | specialisation L1 |" in md
    assert "| a | 1.5000 | 2.5000 | 0.2500 | 0.0000 |" in md
    assert "| ab | 1.5000 | 2.5000 | 0.3750 | 0.0000 |" in md  # seeds averaged
    assert domain.write_plot([("a", [a])], str(tmp_path)) == domain.PLOT_FILE
    assert_png(str(tmp_path / domain.PLOT_FILE))


def test_compare_shows_the_sources_section_only_for_mixtures(tmp_path):
    run = _mixture_run(tmp_path, "mix", 0.3)
    out = compare_runs([run], str(tmp_path / "cmp"))
    assert "Data sources (last logged values)" in out and "| mix | 1.5000 | 2.5000 | 0.3000 |" in out
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "## Data sources" in md and f"]({domain.PLOT_FILE})" in md
    assert os.path.exists(tmp_path / "cmp" / domain.PLOT_FILE)
    write_run(tmp_path, "plain", steps=20)
    plain = load_run(str(tmp_path / "plain"))
    assert domain.section([("plain", [plain])], str(tmp_path / "cmp")) == ("", [])
    assert not os.path.exists(tmp_path / "cmp" / domain.PLOT_FILE)  # the stale plot is gone
