"""`moe train` on a two-source mixture (one source a `moe data prepare` folder): per-source validation
loss and the routing-by-domain matrix land in metrics.jsonl, and the prepared folder is left as it was
(one process, end to end through the CLI)."""
import json
import os

import pytest

from moe.data.prepare import prepare
from tests.helpers import ROOT, data_cfg, listing, read_metrics, read_offline_run, run_moe, write_text_folder


@pytest.mark.slow
def test_train_on_a_prepared_mixture(tmp_path):
    write_text_folder(tmp_path / "prose", n_docs=60)
    (tmp_path / "code").mkdir()
    for i in range(30):  # another kind of text: Python-like lines
        (tmp_path / "code" / f"m{i}.txt").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n"
                                                             for j in range(40)))
    prepare(data_cfg(tmp_path, tmp_path / "code", val_fraction=0.2), str(tmp_path / "code_ready"))
    before = listing(tmp_path / "code_ready")
    (tmp_path / "mix.yaml").write_text(
        f"defaults: [{os.path.join(ROOT, 'experiments', 'debug_moe.yaml')}]\n"
        f"data:\n  val_fraction: 0.2\n  cache_dir: {tmp_path / 'cache'}\n  sources:\n"
        f"    - {{name: code, dataset: '{tmp_path / 'code_ready'}', weight: 3}}\n"
        f"    - {{name: prose, dataset: '{tmp_path / 'prose'}', weight: 1}}\n")
    run_moe(["train", str(tmp_path / "mix.yaml"), "train.steps=6", "train.eval_every=3", "train.log_every=3",
             "train.eval_batches=2", "logging.wandb.mode=offline", f"run.root={tmp_path / 'runs'}", "run.name=mix"],
            cwd=tmp_path)
    lines = read_metrics(tmp_path / "runs" / "mix")
    evals = [m for m in lines if "loss/val" in m]
    assert len(evals) == 2
    for m in evals:
        assert m["loss/val"] == pytest.approx(0.75 * m["loss/val/code"] + 0.25 * m["loss/val/prose"])
    train = [m for m in lines if "loss/train" in m]
    assert train[-1]["router/domain_sources"] == ["code", "prose"]
    for layer in (0, 1):
        rows = train[-1][f"router/layer{layer}/domain"]
        assert len(rows) == 2 and all(len(r) == 4 and abs(sum(r) - 1) < 1e-4 for r in rows)
        assert 0 <= train[-1][f"router/layer{layer}/specialisation"] <= 1
    assert train[-1]["data/tokens/code"] + train[-1]["data/tokens/prose"] == train[-1]["tokens"]
    assert listing(tmp_path / "code_ready") == before
    # the same series in the offline W&B run: per-source losses, domain scores and matrix image, tokens drawn
    history = read_offline_run(tmp_path / "runs" / "mix")["history_keys"]
    for key in ("loss/val/code", "loss/val/prose", "router/layer1/specialisation", "router/domain_heatmap/_type",
                "data/fraction/code"):
        assert key in history, (key, sorted(history))

    # `moe parity` draws the run's batches from the mixture too: its per-step losses over the first window
    # (warmup: the same learning rates at any train.steps) average to the run's logged train loss
    run_moe(["parity", str(tmp_path / "mix.yaml"), "--layouts", "ep=1,nproc=1", "--steps", "3",
             "--keep", str(tmp_path / "parity")], cwd=tmp_path)
    steps = json.loads((tmp_path / "parity" / "layout0.json").read_text())["steps"]
    assert sum(s["loss"] for s in steps) / 3 == pytest.approx(train[0]["loss/train"], rel=1e-6)
