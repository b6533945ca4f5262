"""A prepared two-source mixture trained by 4 gloo processes: the tokens drawn from each source follow
the weights within 1% over 200 steps, a run resumed from its step-175 checkpoint continues bitwise,
and one process with 4x the micro-batch draws the same global batches (per-source token counts equal
at every logged step, losses equal to float rounding)."""
import os
import shutil
import subprocess
import sys

import pytest

from moe.data.prepare import prepare
from tests.helpers import ROOT, TOL, data_cfg, read_metrics, write_text_folder

WEIGHTS = {"code": 0.7, "prose": 0.3}
STEPS = 200
TINY = ["model.d_model=16", "model.n_layers=1", "model.n_heads=1", "model.ffn_hidden=32", "model.moe.expert_hidden=16",
        "model.max_seq_len=16", "train.seq_len=16", "train.global_batch_size=4", f"train.steps={STEPS}",
        "train.warmup_steps=10", "train.eval_every=0", "train.log_every=1", "checkpoint.every=25",
        "checkpoint.keep_last=2", "logging.wandb.mode=disabled"]


def _mixture(tmp_path):
    write_text_folder(tmp_path / "prose", n_docs=60)
    (tmp_path / "code").mkdir()
    for i in range(30):
        (tmp_path / "code" / f"m{i}.txt").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n"
                                                             for j in range(40)))
    for name in WEIGHTS:
        prepare(data_cfg(tmp_path, tmp_path / name, val_fraction=0.2), str(tmp_path / f"{name}_ready"))
    path = tmp_path / "mix.yaml"
    path.write_text(f"defaults: [{os.path.join(ROOT, 'experiments', 'debug_moe.yaml')}]\n"
                    f"data:\n  val_fraction: 0.2\n  cache_dir: {tmp_path / 'cache'}\n  sources:\n"
                    + "".join(f"    - {{name: {n}, dataset: '{tmp_path / f'{n}_ready'}', weight: {w}}}\n"
                              for n, w in WEIGHTS.items()))
    return path


def _train(tmp_path, mix, nproc, name, *extra):
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    proc = subprocess.run([sys.executable, *launcher, "-m", "moe.cli", "train", str(mix), *TINY,
                           f"run.root={tmp_path / 'runs'}", f"run.name={name}", *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _train_records(run_dir):
    return {m["step"]: m for m in read_metrics(run_dir) if "loss/train" in m}


def _weights(run_dir, step):
    from safetensors.torch import load_file

    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    return {f: load_file(str(folder / f)) for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")}


@pytest.mark.slow
@pytest.mark.distributed
def test_four_processes_on_a_prepared_mixture(tmp_path):
    mix = _mixture(tmp_path)
    runs = tmp_path / "runs"
    _train(tmp_path, mix, 4, "four", "train.micro_batch_size=1")
    four = _train_records(runs / "four")
    assert sorted(four) == list(range(1, STEPS + 1))

    # the weights, within 1% over 200 steps, counted by the ranks as they drew their micro-batches
    last = four[STEPS]
    drawn = {n: last[f"data/tokens/{n}"] for n in WEIGHTS}
    assert sum(drawn.values()) == last["tokens"] == STEPS * 4 * 16
    for name, weight in WEIGHTS.items():
        assert abs(last[f"data/fraction/{name}"] - weight) <= 0.01, (name, last[f"data/fraction/{name}"])

    # resumed from the step-175 checkpoint (the newer one gone): the same records and weights, bitwise
    shutil.copytree(runs / "four", runs / "resumed")
    cfg = runs / "resumed" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("name: four\n", "name: resumed\n", 1))
    shutil.rmtree(runs / "resumed" / "checkpoints" / f"step_{STEPS:08d}")
    out = _train(tmp_path, mix, 4, "resumed", "train.micro_batch_size=1")
    assert "resuming from step_00000175" in out.stdout + out.stderr
    resumed = _train_records(runs / "resumed")
    for step in range(176, STEPS + 1):
        for key in ("loss/train", "grad_norm", *(f"data/tokens/{n}" for n in WEIGHTS)):
            assert resumed[step][key] == four[step][key], (step, key)
    want, got = _weights(runs / "four", STEPS), _weights(runs / "resumed", STEPS)
    assert want.keys() == got.keys() and want
    for f in want:
        for k in want[f]:
            assert want[f][k].equal(got[f][k]), (f, k)

    # one process, 4x the micro-batch, 50 steps: the same sources in every global batch, and the same
    # sequences: the losses agree to float rounding over the 10 warm-up steps (whose learning rates do not
    # depend on train.steps; later the two runs' rounding differences grow, through routing decisions)
    _train(tmp_path, mix, 1, "one", "train.micro_batch_size=4", "train.steps=50")
    one = _train_records(runs / "one")
    assert sorted(one) == list(range(1, 51))
    for step in one:
        assert [one[step][f"data/tokens/{n}"] for n in WEIGHTS] == [four[step][f"data/tokens/{n}"] for n in WEIGHTS]
    for step in range(1, 11):
        assert one[step]["loss/train"] == pytest.approx(four[step]["loss/train"], rel=TOL, abs=TOL), step
