"""moe/tools/sweep.py on small sweep files in tmp_path: a sweep expands to variants x grid x seeds runs
with stable names and the override lists `moe train` gets; bad sweep files fail before anything runs,
naming the key; finished runs (and runs an earlier Slurm array still has) are skipped; run_local starts
one `moe train` per pending run and records how each ended in sweep.json; the W&B sweep export. The
sweeps that really train, and `--slurm` against fake Slurm commands, are in
tests/integration/test_sweep.py."""
import json
import os
import sys

import pytest

import moe.tools.sweep as sweep_mod
from moe.config import ConfigError, load_config
from moe.tools.sweep import load_sweep, pending_runs, read_manifest, run_local, run_status, wandb_sweep_config

from tests.helpers import ROOT

MOE_YAML = os.path.join(ROOT, "experiments", "debug_moe.yaml")
GRID = "grid:\n  model.moe.top_k: [1, 2]\n  model.moe.aux_loss_coef: [0.0, 0.01]\n"
CROSSED = ("overrides: [train.steps=7]\ngrid:\n  model.moe.top_k: [1, 2]\n"
           "variants:\n  - {model.moe.aux_loss_coef: 0.0}\n  - {model.moe.aux_loss_coef: 0.01, model.moe.z_loss_coef: 0.001}\n"
           "seeds: [0, 1]\n")


def write(tmp_path, text, name="s.yaml", base=MOE_YAML):
    path = tmp_path / name
    path.write_text((f"base: {base}\n" if base else "") + text)
    return str(path)


def load(tmp_path, text, **kw):
    return load_sweep(write(tmp_path, text, **kw), runs_root=str(tmp_path / "runs"))


# ------------------------------------------------------------------------------------------- expansion


def test_grid_names_are_deterministic(tmp_path):
    sweep = load(tmp_path, "name: g\n" + GRID)
    names = [r.name for r in sweep.runs]
    assert names == ["top_k=1,aux_loss_coef=0.0", "top_k=1,aux_loss_coef=0.01",
                     "top_k=2,aux_loss_coef=0.0", "top_k=2,aux_loss_coef=0.01"]
    assert names == [r.name for r in load_sweep(sweep.path, runs_root=str(tmp_path / "runs")).runs]
    assert sweep.name == "g" and sweep.root == str(tmp_path / "runs" / "g")
    assert sweep.swept_keys == ["model.moe.top_k", "model.moe.aux_loss_coef"]


def test_variants_x_grid_x_seeds(tmp_path):
    sweep = load(tmp_path, CROSSED)
    assert sweep.name == "s"  # the file's stem without `name`
    assert sweep.swept_keys == ["model.moe.aux_loss_coef", "model.moe.z_loss_coef", "model.moe.top_k", "run.seed"]
    assert [r.name for r in sweep.runs] == [
        "aux_loss_coef=0.0,top_k=1,seed=0", "aux_loss_coef=0.0,top_k=1,seed=1",
        "aux_loss_coef=0.0,top_k=2,seed=0", "aux_loss_coef=0.0,top_k=2,seed=1",
        "aux_loss_coef=0.01,z_loss_coef=0.001,top_k=1,seed=0", "aux_loss_coef=0.01,z_loss_coef=0.001,top_k=1,seed=1",
        "aux_loss_coef=0.01,z_loss_coef=0.001,top_k=2,seed=0", "aux_loss_coef=0.01,z_loss_coef=0.001,top_k=2,seed=1"]
    run = sweep.runs[5]
    assert run.overrides == {"model.moe.aux_loss_coef": 0.01, "model.moe.z_loss_coef": 0.001, "model.moe.top_k": 1,
                             "run.seed": 1}
    root = str(tmp_path / "runs" / "s")
    assert run.args == ["train.steps=7", "model.moe.aux_loss_coef=0.01", "model.moe.z_loss_coef=0.001",
                        "model.moe.top_k=1", "run.seed=1", f"run.name={run.name}", f"run.root={root}",
                        "logging.wandb.group=s",
                        "logging.wandb.tags=[aux_loss_coef:0.01,z_loss_coef:0.001,top_k:1,seed:1]",
                        "logging.wandb.job_type=train"]
    # what `moe train` makes of them
    cfg = load_config(sweep.base, run.args)
    assert (cfg.train.steps, cfg.model.moe.top_k, cfg.model.moe.z_loss_coef, cfg.run.seed) == (7, 1, 0.001, 1)
    assert (cfg.run.name, cfg.run.root, cfg.logging.wandb.group) == (run.name, root, "s")
    assert list(cfg.logging.wandb.tags) == ["aux_loss_coef:0.01", "z_loss_coef:0.001", "top_k:1", "seed:1"]


def test_seeds_alone_and_the_base_relative_to_the_sweep_file(tmp_path):
    os.symlink(os.path.join(ROOT, "experiments"), tmp_path / "experiments")
    sweep = load(tmp_path, "seeds: [3, 4]\n", base="experiments/debug_moe.yaml")
    assert sweep.base == str(tmp_path / "experiments" / "debug_moe.yaml")
    assert [r.name for r in sweep.runs] == ["seed=3", "seed=4"] and sweep.common == []


def test_names_do_not_depend_on_the_order_a_variant_is_written_in(tmp_path):
    a = load(tmp_path, "variants:\n  - {model.moe.z_loss_coef: 0.001, model.moe.aux_loss_coef: 0.01}\n")
    b = load(tmp_path, "variants:\n  - {model.moe.aux_loss_coef: 0.01, model.moe.z_loss_coef: 0.001}\n", name="t.yaml")
    assert [r.name for r in a.runs] == [r.name for r in b.runs] == ["aux_loss_coef=0.01,z_loss_coef=0.001"]
    assert a.swept_keys == b.swept_keys == ["model.moe.aux_loss_coef", "model.moe.z_loss_coef"]


def test_run_names_are_folder_safe(tmp_path):
    sweep = load(tmp_path, "variants:\n  - {logging.wandb.project: 'my proj/v2'}\n  - {logging.wandb.project: x}\n")
    assert [r.name for r in sweep.runs] == ["project=my_proj_v2", "project=x"]
    assert "logging.wandb.project=my proj/v2" in sweep.runs[0].args


# ------------------------------------------------------------------------------------------ bad files


@pytest.mark.parametrize("text,match", [
    ("grid:\n  model.moe.topk: [1, 2]\n", r"run topk=1: .*topk"),
    ("grid:\n  model.moe.top_k: []\n", r"grid key 'model.moe.top_k' needs a non-empty list of values, got \[\]"),
    ("grid:\n  model.moe.top_k: 2\n", r"grid key 'model.moe.top_k' needs a non-empty list of values, got 2"),
    ("grid: [1, 2]\n", r"`grid` must map dotted keys to lists of values"),
    ("variants: {model.moe.top_k: 1}\n", r"`variants` must be a list of mappings"),
    ("variants: [model.moe.top_k=1]\n", r"`variants` must be a list of mappings"),
    ("seeds: 3\n", r"`seeds` must be a non-empty list"),
    ("grid:\n  model.moe.top_k: [1]\nseeds: []\n", r"`seeds` must be a non-empty list"),
    ("", r"empty sweep: give a `grid`, `variants` or `seeds`"),
    ("grid:\n  model.moe.top_k: [1, 9]\n", r"run top_k=9: .*model\.moe\.top_k"),
    ("gird: {}\n", r"unknown sweep keys \['gird'\]; allowed: "),
    ("variants:\n  - {logging.wandb.project: 'a b'}\n  - {logging.wandb.project: 'a/b'}\n",
     r"several runs would share the names \['project=a_b'\]"),
])
def test_bad_sweeps_fail_before_running_naming_the_key(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        load_sweep(path, runs_root=str(tmp_path / "runs"))
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["s.yaml"]


@pytest.mark.parametrize("text,match", [
    ("grid:\n  model.moe.top_k: [1]\n", r": `base` \(the config every run starts from\) is required"),
    ("- a\n- b\n", r": top level must be a mapping"),
])
def test_base_and_mapping_are_required(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_sweep(write(tmp_path, text, base=None))


def test_missing_sweep_file(tmp_path):
    with pytest.raises(ConfigError, match=f"^sweep file not found: {tmp_path / 'none.yaml'}$"):
        load_sweep(str(tmp_path / "none.yaml"))


def test_every_run_is_validated_for_the_world_it_trains_in(tmp_path):
    path = write(tmp_path, "overrides: [parallel.ep_size=2]\ngrid:\n  model.moe.top_k: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"run top_k=1: .*ep_size"):
        load_sweep(path, runs_root=str(tmp_path / "runs"))
    assert len(load_sweep(path, runs_root=str(tmp_path / "runs"), world_size=2).runs) == 2


# ----------------------------------------------------------------------------------- skipping finished


def run_dir(sweep, name, summary):
    d = os.path.join(sweep.root, name)
    os.makedirs(d)
    if summary is not None:
        with open(os.path.join(d, "summary.json"), "w") as f:
            f.write(summary if isinstance(summary, str) else json.dumps(summary))
    return d


def test_run_status(tmp_path):
    sweep = load(tmp_path, GRID)
    names = [r.name for r in sweep.runs]
    dirs = [run_dir(sweep, names[0], {"status": "finished"}), run_dir(sweep, names[1], {"status": "preempted"}),
            run_dir(sweep, names[2], '{"status": "fini'), run_dir(sweep, names[3], None)]
    assert [run_status(d) for d in dirs] == ["finished", "unfinished", "unfinished", "missing"]
    assert run_status(str(tmp_path / "nowhere")) == "missing"


def test_finished_runs_are_skipped(tmp_path):
    sweep = load(tmp_path, GRID)
    names = [r.name for r in sweep.runs]
    run_dir(sweep, names[1], {"status": "finished", "val_loss": 2.0})
    run_dir(sweep, names[2], {"status": "running"})  # unfinished: resumed
    logged = []
    pending, results = pending_runs(sweep, log=logged.append)
    assert [r.name for r in pending] == [names[0], names[2], names[3]]
    assert results == {names[1]: {"status": "finished", "skipped": True}}
    assert logged == [f"[sweep] {names[1]}: finished earlier, skipped"]


def test_runs_an_earlier_slurm_array_still_has_are_skipped(tmp_path, monkeypatch):
    sweep = load(tmp_path, GRID)
    names = [r.name for r in sweep.runs]
    os.makedirs(sweep.root)
    entries = [{"name": names[i], "values": {}, "args": [], "status": "submitted", "job_id": "77", "task_id": i,
                "log": f"logs/slurm-77_{i}.out"} for i in (0, 1)]
    with open(os.path.join(sweep.root, "sweep.json"), "w") as f:
        json.dump({"name": sweep.name, "runs": entries}, f)
    asked = []
    monkeypatch.setattr(sweep_mod, "active_array_tasks", lambda job: asked.append(job) or {0: "RUNNING"})
    logged = []
    pending, results = pending_runs(sweep, log=logged.append)
    assert asked == ["77"]
    assert [r.name for r in pending] == names[1:]  # task 1 has left Slurm without finishing: run it again
    assert results == {names[0]: {"status": "submitted", "job_id": "77", "task_id": 0, "log": "logs/slurm-77_0.out"}}
    assert logged == [f"[sweep] {names[0]}: running in Slurm job 77_0, skipped"]


def test_a_rerun_of_a_finished_sweep_starts_nothing(tmp_path, monkeypatch):
    sweep = load(tmp_path, GRID)
    for r in sweep.runs:
        run_dir(sweep, r.name, {"status": "finished"})
    monkeypatch.setattr(sweep_mod.subprocess, "Popen", lambda *a, **k: pytest.fail(f"started {a}"))
    results = run_local(sweep, log=lambda line: None)
    assert results == {r.name: {"status": "finished", "skipped": True} for r in sweep.runs}
    manifest = json.load(open(os.path.join(sweep.root, "sweep.json")))
    assert [r["status"] for r in manifest["runs"]] == ["finished"] * 4
    assert read_manifest(sweep)[sweep.runs[0].name]["skipped"] is True


class FakeTrain:
    """A `moe train` process that ends at once: it writes a finished summary.json unless its run name
    holds top_k=2, and exits 0 unless the name is top_k=2,aux_loss_coef=0.01."""
    started = []

    def __init__(self, cmd, stdout, stderr, env):
        self.cmd, self.env = cmd, env
        FakeTrain.started.append(self)
        run_name = next(a.split("=", 1)[1] for a in cmd if a.startswith("run.name="))
        root = next(a.split("=", 1)[1] for a in cmd if a.startswith("run.root="))
        os.makedirs(os.path.join(root, run_name), exist_ok=True)
        if "top_k=2" not in run_name:
            with open(os.path.join(root, run_name, "summary.json"), "w") as f:
                json.dump({"status": "finished"}, f)
        self.returncode = 1 if run_name == "top_k=2,aux_loss_coef=0.01" else 0
        stdout.write("trained\n")

    def poll(self):
        return self.returncode


def test_run_local_runs_each_pending_run_and_records_how_it_ended(tmp_path, monkeypatch):
    sweep = load(tmp_path, GRID)
    names = [r.name for r in sweep.runs]
    run_dir(sweep, names[0], {"status": "finished"})
    FakeTrain.started = []
    monkeypatch.setattr(sweep_mod.subprocess, "Popen", FakeTrain)
    monkeypatch.setattr(sweep_mod.time, "sleep", lambda s: None)
    logged = []
    results = run_local(sweep, parallel=2, threads=3, log=logged.append)
    assert [p.cmd for p in FakeTrain.started] == [
        [sys.executable, "-m", "moe.cli", "train", MOE_YAML, *r.args, "train.threads=3", "logging.progress=false"]
        for r in sweep.runs[1:]]
    # exit 0 without a finished summary (top_k=2,aux_loss_coef=0.0) is a failure too
    assert {n: r["status"] for n, r in results.items()} == {names[0]: "finished", names[1]: "finished",
                                                             names[2]: "failed", names[3]: "failed"}
    assert results[names[3]]["returncode"] == 1 and results[names[2]]["returncode"] == 0
    assert results[names[1]]["log"] == os.path.join(sweep.root, f"{names[1]}.log")
    assert open(results[names[1]]["log"]).read() == "trained\n"
    manifest = json.load(open(os.path.join(sweep.root, "sweep.json")))
    assert [r["name"] for r in manifest["runs"]] == names
    assert [r["status"] for r in manifest["runs"]] == ["finished", "finished", "failed", "failed"]
    assert manifest["swept_keys"] == sweep.swept_keys and manifest["base"] == MOE_YAML
    assert f"[sweep] start {names[1]} (log: {results[names[1]]['log']})" in logged


# ---------------------------------------------------------------------------------------- W&B export


def test_wandb_export(tmp_path):
    sweep = load(tmp_path, CROSSED)
    cfg = wandb_sweep_config(sweep)
    assert (cfg["name"], cfg["method"], cfg["metric"]) == ("s", "grid", {"name": "loss/val", "goal": "minimize"})
    assert cfg["parameters"] == {"model.moe.aux_loss_coef": {"values": [0.0, 0.01]},
                                 "model.moe.z_loss_coef": {"values": [0.001]},
                                 "model.moe.top_k": {"values": [1, 2]}, "run.seed": {"values": [0, 1]}}
    assert cfg["command"] == ["${env}", "${interpreter}", "-m", "moe.cli", "train", MOE_YAML, "train.steps=7",
                              "logging.wandb.group=s", "${args_no_hyphens}"]
