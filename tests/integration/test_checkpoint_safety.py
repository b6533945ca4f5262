"""Checkpoints are data, never code, and a run folder is never silently lost (issue 14).

Each test names the finding it covers: 1 planted code, 2 retraining deleted newer checkpoints,
3 a lost `latest` restarted the run, 4 two trainers in one folder, 5 non-finite training finished,
6 corruption went unnoticed, 9 leftovers, Ctrl-C and one-line errors.
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from moe.train.checkpoint import folders, integrity, loading, trainer_state
from moe.train.checkpoint.manifest import write_manifest
from moe.errors import CheckpointError, RunFolderBusy, TrainingDiverged
from tests.helpers import ROOT, read_metrics, run_moe, tiny_run_args

# one worker runs this module, so its base run (module fixture, a `moe train` process) is trained once
pytestmark = pytest.mark.xdist_group("checkpoint_safety")

FIXTURE_V1 = os.path.join(ROOT, "tests", "fixtures", "checkpoint_v1")


class Payload:
    """Unpickling this makes the folder `marker`: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def pickle_payload(path, marker):
    torch.save({"module": {"w": torch.zeros(1)}, "train_state": Payload(marker)}, str(path))


def only_error_line(stderr):
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, text_corpus):
    """A finished 4-step debug MoE run with checkpoints at steps 2 and 4, trained once per module."""
    work = tmp_path_factory.mktemp("base")
    os.symlink(os.path.join(ROOT, "experiments"), work / "experiments")
    cache = str(work / "cache")
    run_moe(tiny_run_args(text_corpus, cache, "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=3",
                          "run.name=base"), cwd=work)
    return {"work": work, "cache": cache, "corpus": text_corpus, "run": work / "runs" / "base"}


@pytest.fixture
def run_copy(base_run, tmp_path):
    """A private copy of the base run (and the experiments link) in tmp_path."""
    os.symlink(os.path.join(ROOT, "experiments"), tmp_path / "experiments")
    shutil.copytree(base_run["run"], tmp_path / "runs" / "base")
    return tmp_path / "runs" / "base"


def args(base_run, *extra):
    return tiny_run_args(base_run["corpus"], base_run["cache"], "run.name=base", *extra)


def tree_digest(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


# ------------------------------------------------------------------------------------ 1. no code


def plant(step_dir, name, marker):
    """Replace one file of a step folder by a payload in its own syntax, then rewrite the manifest
    so the folder passes the checksums: what an attacker who can write the folder can do."""
    path = step_dir / name
    if name == "config.yaml":
        path.write_text(f"run: !!python/object/apply:os.mkdir ['{marker}']\n")
    else:  # pickle bytes where safetensors or JSON is expected
        pickle_payload(path, marker)
    if name != "manifest.json":
        (step_dir / "manifest.json").unlink()
        write_manifest(str(step_dir))


def test_1_a_payload_in_any_checkpoint_file_never_runs(run_copy, tmp_path):
    from moe.config import ConfigError, config_from_yaml_text
    from moe.tools.inference import load_run

    step = run_copy / "checkpoints" / "step_00000004"
    names = sorted(os.listdir(step))
    assert {"trainer.json", "manifest.json", "model.safetensors", "config.yaml"} <= set(names)
    assert "trainer.pt" not in names  # nothing pickled is written any more
    for name in names:
        work = tmp_path / f"planted-{name}"
        shutil.copytree(run_copy, work)
        marker = tmp_path / f"ran-{name}"
        sdir = work / "checkpoints" / "step_00000004"
        plant(sdir, name, marker)
        assert integrity.verify(str(sdir)), name  # the folder is refused ...
        for reader in (lambda: loading.consolidated_state_dict(str(sdir)),
                       lambda: trainer_state.read_trainer(str(sdir)),
                       lambda: loading.export(str(sdir), str(tmp_path / "out.safetensors")),
                       lambda: loading.load_model_weights(str(work / "checkpoints")),
                       lambda: load_run(str(work)),
                       lambda: config_from_yaml_text((sdir / "config.yaml").read_text(errors="replace"))):
            try:
                reader()
            except (CheckpointError, ConfigError):
                pass
        assert not marker.exists(), f"code planted in {name} ran"  # ... and nothing ran


def test_1_format1_trainer_pt_and_deepspeed_folder_are_read_without_running_code(run_copy, tmp_path):
    # format 1 (trainer.pt, read with weights_only): a planted object is refused naming the file
    v1 = tmp_path / "v1"
    shutil.copytree(os.path.join(FIXTURE_V1, "v1_moe"), v1)
    step = v1 / "checkpoints" / "step_00000003"
    assert integrity.verify(str(step)) == []  # the genuine one reads
    marker = tmp_path / "ran-v1"
    pickle_payload(step / "trainer.pt", marker)
    problems = integrity.verify(str(step))
    assert problems and "trainer.pt: refused to load" in problems[0]
    # DeepSpeed's own (legacy) format: only tensors and plain data are read, through the safe loader
    legacy = tmp_path / "legacy" / "checkpoints" / "step_00000002"
    legacy.mkdir(parents=True)
    pickle_payload(legacy / folders.LEGACY_MODEL_FILE, marker)
    (legacy.parent / "latest").write_text("step_00000002")
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: refused to load"):
        loading.load_model_weights(str(legacy.parent))
    from moe.train.checkpoint.loading import _safe_scan_legacy

    with pytest.raises(CheckpointError, match="refused to load"):
        _safe_scan_legacy(str(legacy))  # what `moe train` runs before DeepSpeed's unpickling loader
    assert not marker.exists()


@pytest.mark.slow
def test_1_commands_that_read_checkpoints_refuse_planted_code(base_run, run_copy, tmp_path):
    """`moe train` (resume) and `moe generate` (what `moe eval` loads too, `load_run`) on planted files:
    one error line naming the file, exit 2, nothing ran (`ckpt verify` and `ckpt export` are the
    functions above)."""
    marker = tmp_path / "ran"
    step = run_copy / "checkpoints" / "step_00000004"
    plant(step, "model.safetensors", marker)
    cwd = run_copy.parent.parent
    proc = run_moe(args(base_run, "train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=3"), cwd=cwd,
                   check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.safetensors" in only_error_line(proc.stderr)
    # the config stored with the checkpoint is YAML read safely: a python tag is an error, not a call
    other = tmp_path / "other" / "base"
    shutil.copytree(base_run["run"], other)
    plant(other / "checkpoints" / "step_00000004", "config.yaml", marker)
    proc = run_moe(["generate", str(other), "--prompt", "def "], cwd=cwd, check=False)
    assert proc.returncode == 2 and "config.yaml" in only_error_line(proc.stderr)
    assert not marker.exists()


def test_a_format1_checkpoint_of_an_earlier_version_resumes_on_the_same_curve(tmp_path, data_cache):
    """The fixture was written by the code before this change (trainer.pt); resuming it with this
    code gives, step for step, the losses of an uninterrupted run of that code."""
    os.symlink(os.path.join(ROOT, "experiments"), tmp_path / "experiments")
    shutil.copytree(os.path.join(FIXTURE_V1, "v1_moe"), tmp_path / "runs" / "v1_moe")
    ref = json.load(open(os.path.join(FIXTURE_V1, "straight_run.json")))["loss_by_step"]
    proc = run_moe(["train", "runs/v1_moe/config.yaml", "train.steps=5", "logging.wandb.mode=disabled"],
                   cwd=tmp_path)
    assert "resuming from step_00000003" in proc.stdout
    got = {m["step"]: m["loss/train"] for m in read_metrics(tmp_path / "runs" / "v1_moe") if "loss/train" in m}
    assert got == {int(k): v for k, v in ref.items()}
    assert "trainer.json" in os.listdir(tmp_path / "runs" / "v1_moe" / "checkpoints" / "step_00000005")


# ----------------------------------------------------------------- 2. retraining keeps the run


def test_2_starting_over_a_folder_with_checkpoints_is_refused_and_changes_nothing(run_copy):
    from moe.config import ConfigError, load_config
    from moe.train.run_dir import prepare_run_dir

    root = str(run_copy.parent)
    before = tree_digest(run_copy)
    cfg = load_config(str(run_copy / "config.yaml"), ["train.steps=3", "checkpoint.resume=false", f"run.root={root}"])
    with pytest.raises(ConfigError, match="checkpoint.resume=false, but .* holds checkpoints .*run.overwrite=true"):
        prepare_run_dir(cfg, is_writer=True)
    assert tree_digest(run_copy) == before
    # with run.overwrite=true the old run is moved aside whole, and the new one starts in a clean folder
    cfg.run.overwrite = True
    prepare_run_dir(cfg, is_writer=True)
    aside = [p for p in os.listdir(root) if p.startswith("base.old-")]
    assert len(aside) == 1 and tree_digest(run_copy.parent / aside[0]) == before
    assert folders.list_steps(str(run_copy / "checkpoints")) == []


def test_2_pruning_never_deletes_a_newer_checkpoint(tmp_path):
    for s in (2, 4, 6, 20, 30):
        (tmp_path / folders.step_tag(s)).mkdir()
    gone = folders.prune(str(tmp_path), just_written=6, keep_last=2)  # keeps 6 and the one before it
    assert gone == ["step_00000002"]
    assert folders.list_steps(str(tmp_path)) == [4, 6, 20, 30]


# --------------------------------------------------------------------------- 3. lost `latest`


@pytest.mark.parametrize("damage", ["missing", "dangling"])
def test_3_a_lost_latest_falls_back_to_the_newest_verified_step(run_copy, damage):
    ckpt = run_copy / "checkpoints"
    if damage == "missing":
        (ckpt / "latest").unlink()
    else:
        (ckpt / "latest").write_text("step_00000099")
    shutil.copytree(ckpt / "step_00000004", ckpt / "step_00000006")  # newest, but it fails verification
    tag, note = integrity.find_resume(str(ckpt))
    assert tag == "step_00000004"
    assert ("missing" if damage == "missing" else "step_00000099") in note and "skipped step_00000006" in note
    with pytest.raises(CheckpointError, match="latest"):
        folders.latest_tag(str(ckpt))  # the plain pointer read still refuses to guess


def test_3_and_9_resume_without_latest_continues_the_run_and_clears_leftovers(base_run, run_copy):
    ckpt = run_copy / "checkpoints"
    (ckpt / "latest").unlink()
    (ckpt / ".tmp-step_00000006").mkdir()  # what a kill -9 during a save leaves
    (ckpt / ".tmp-step_00000006" / "model.safetensors").write_bytes(b"x" * 1000)
    (ckpt / "latest.tmp").write_text("step_00000006")
    proc = run_moe(args(base_run, "train.steps=5", "checkpoint.every=2", "checkpoint.keep_last=3"),
                   cwd=run_copy.parent.parent)
    assert "resuming from step_00000004" in proc.stdout and "newest complete and verified" in proc.stdout
    assert "left by an interrupted save" in proc.stdout
    steps = [m["step"] for m in read_metrics(run_copy) if "loss/train" in m]
    assert steps == [1, 2, 3, 4, 5]  # none lost, none repeated
    assert sorted(os.listdir(ckpt)) == ["latest", "step_00000002", "step_00000004", "step_00000005"]
    assert (ckpt / "latest").read_text() == "step_00000005"


# ----------------------------------------------------------------------------- 4. one trainer


def test_4_the_run_folder_lock_names_its_holder_and_dies_with_it(tmp_path):
    from moe.io import RunLock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from moe.io import RunLock; RunLock(sys.argv[1], 'r').acquire(); print('held', "
        "flush=True); time.sleep(60)"), str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"pid {holder.pid} on .* since"):
            RunLock(str(tmp_path), "r").acquire()
        RunLock(str(tmp_path), "other").acquire()  # another folder is free
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(str(tmp_path), "r")
    lock.acquire()  # the kernel released the dead holder's lock
    lock.release()


@pytest.mark.slow
def test_4_and_9_a_second_trainer_is_refused_and_the_first_ctrl_c_saves_and_stops(base_run, tmp_path):
    os.symlink(os.path.join(ROOT, "experiments"), tmp_path / "experiments")
    from moe.metrics import training_env

    env = training_env({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    first = subprocess.Popen([sys.executable, "-m", "moe.cli", *args(base_run, "train.steps=100000")],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "base"
    try:
        deadline = time.time() + 120
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip()) \
                and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        second = run_moe(args(base_run, "train.steps=100000"), cwd=tmp_path, check=False)
        assert second.returncode == 2
        assert f"pid {first.pid}" in only_error_line(second.stderr)
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    assert "Ctrl-C: saving a checkpoint" in out and "on SIGINT; checkpoint saved" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "preempted" and "SIGINT" in summary["reason"]
    tag = (run / "checkpoints" / "latest").read_text()
    assert integrity.verify(str(run / "checkpoints" / tag)) == []
    assert int(tag.split("_")[1]) == summary["steps"]
    steps = [m["step"] for m in read_metrics(run) if "loss/train" in m]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no step logged twice


# ------------------------------------------------------------------------------ 5. non-finite


def test_5_diverging_training_stops_saves_nothing_and_fails(base_run, run_copy):
    """Weights that overflow the attention (finite, so the checkpoint verifies) make the next step's
    loss NaN: the run stops at that step with one error line, saves nothing (keep_last=1 would have
    rotated the older checkpoints away) and says why in summary.json."""
    from safetensors.torch import load_file, save_file

    ckpt = run_copy / "checkpoints"
    step = ckpt / "step_00000004"
    weights = load_file(str(step / "model.safetensors"))
    weights["blocks.0.attn.qkv.weight"] *= 1e30
    save_file(weights, str(step / "model.safetensors"), metadata={"format": folders.FORMAT})
    (step / "manifest.json").unlink()
    write_manifest(str(step))
    assert integrity.verify(str(step)) == []
    before = tree_digest(ckpt)
    proc = run_moe(args(base_run, "train.steps=20", "checkpoint.every=1", "checkpoint.keep_last=1"),
                   cwd=run_copy.parent.parent, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = only_error_line(proc.stderr)
    assert line.startswith("error: step 5: non-finite training (loss nan") and "stopped without saving" in line, line
    assert f"the last checkpoint, {ckpt}/step_00000004, is untouched" in line or "step_00000004" in line
    summary = json.loads((run_copy / "summary.json").read_text())
    assert summary["status"] == "failed" and "step 5" in summary["reason"]
    assert tree_digest(ckpt) == before


def test_5_a_checkpoint_with_a_nan_weight_is_refused_even_with_matching_checksums(run_copy):
    from safetensors.torch import load_file, save_file

    step = run_copy / "checkpoints" / "step_00000004"
    weights = load_file(str(step / "model.safetensors"))
    weights["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    save_file(weights, str(step / "model.safetensors"), metadata={"format": folders.FORMAT})
    (step / "manifest.json").unlink()
    write_manifest(str(step))
    problems = integrity.verify(str(step))
    assert problems == [f"{step}/model.safetensors: blocks.0.attn.qkv.weight has 1 non-finite values"]
    with pytest.raises(CheckpointError, match="non-finite values"):
        loading.verify_once(str(step))  # what loading runs first, on every rank


def test_5_saving_non_finite_tensors_raises_before_anything_is_written():
    from moe.train.checkpoint.saving import _agree_finite

    _agree_finite(3, {"a": torch.ones(2)})
    with pytest.raises(TrainingDiverged, match="step 3: 1 tensors hold non-finite values .*b"):
        _agree_finite(3, {"a": torch.ones(2)}, {"b": torch.tensor([1.0, float("inf")])})


# ----------------------------------------------------------------------------- 6. integrity


def test_6_verify_catches_one_flipped_byte_in_any_file(run_copy):
    step = run_copy / "checkpoints" / "step_00000004"
    original = tree_digest(step)
    for name, data in sorted(original.items()):
        for pos in sorted({0, len(data) // 2, len(data) - 1}):
            flipped = bytearray(data)
            flipped[pos] ^= 0x01
            (step / name).write_bytes(bytes(flipped))
            problems = integrity.verify(str(step))
            assert problems and any(name in p for p in problems), (name, pos, problems)
            (step / name).write_bytes(data)
    assert integrity.verify(str(step)) == []


def test_6_a_swapped_trainer_state_or_renamed_folder_disagrees_on_the_step(run_copy):
    ckpt = run_copy / "checkpoints"
    step4 = ckpt / "step_00000004"
    shutil.copy(ckpt / "step_00000002" / "trainer.json", step4 / "trainer.json")
    (step4 / "manifest.json").unlink()
    write_manifest(str(step4))  # checksums that match: only the step check can tell
    assert integrity.verify(str(step4)) == [
        f"{step4}: the step differs between meta.json (4), the folder name (4), trainer.json (2), "
        f"train_state.json (4)"]
    os.rename(ckpt / "step_00000002", ckpt / "step_00000008")
    assert "the folder name (8)" in integrity.verify(str(ckpt / "step_00000008"))[0]


@pytest.mark.slow
def test_6_resume_refuses_a_corrupt_checkpoint_naming_the_file(base_run, run_copy):
    shard = run_copy / "checkpoints" / "step_00000004" / "experts-ep000-of001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    before = tree_digest(run_copy)
    proc = run_moe(args(base_run, "train.steps=6"), cwd=run_copy.parent.parent, check=False)
    assert proc.returncode == 2
    line = only_error_line(proc.stderr)
    assert "experts-ep000-of001.safetensors: corrupt" in line and "moe ckpt verify" in line
    after = tree_digest(run_copy)
    assert {k: v for k, v in after.items() if k != "summary.json"} == \
        {k: v for k, v in before.items() if k != "summary.json"}


# ----------------------------------------------------------------- 9. leftovers, Ctrl-C, errors


def test_9_a_full_disk_during_a_save_is_one_error_line_and_loses_nothing(base_run, run_copy):
    """RLIMIT_FSIZE stands in for a full disk: the write of the first large checkpoint file fails."""
    before = tree_digest(run_copy / "checkpoints")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (250_000, 250_000))

    from moe.metrics import training_env

    env = training_env({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, "-m", "moe.cli", *args(base_run, "train.steps=5")],
                          cwd=run_copy.parent.parent, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)
    assert proc.returncode == 2
    line = only_error_line(proc.stderr)
    assert ".tmp-step_00000005/" in line and ".safetensors" in line, line
    assert tree_digest(run_copy / "checkpoints") == before  # the temporary folder is gone, the rest untouched


def test_errors_are_one_line_and_moe_debug_shows_the_traceback(tmp_path):
    proc = run_moe(["ckpt", "export", str(tmp_path), str(tmp_path / "x.safetensors")], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and str(tmp_path) in only_error_line(proc.stderr)
    proc = run_moe(["ckpt", "export", str(tmp_path), str(tmp_path / "x.safetensors")], cwd=tmp_path, check=False,
                   env_extra={"MOE_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr
