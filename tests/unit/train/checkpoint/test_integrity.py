"""moe/train/checkpoint/integrity.py: reading and verifying a step folder without the model -- meta.json,
the safetensors headers and expert index, every check of `verify` (checksums, files and shapes, each
expert exactly once, one step everywhere, a readable config, finiteness), each problem naming the file
or tensor -- and choosing the folder to resume from (`find_resume`, `resolve_step_dir`). On copies of
the committed format-1 fixture and of a format-2 folder saved by a real engine in one child process."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe.errors import CheckpointError, CheckpointNotFound
from moe.train.checkpoint import integrity
from moe.train.checkpoint.folders import FORMAT, write_latest
from moe.train.checkpoint.integrity import (all_finite, expert_index, find_resume, headers, read_meta, read_tensors,
                                            resolve_step_dir, shard_files, verify)
from moe.train.checkpoint.manifest import write_manifest
from tests.helpers import ROOT, run_engine_script

# one worker runs this module, so its engine subprocess (module fixture) runs once
pytestmark = pytest.mark.xdist_group("engine_integrity")

V1_STEP = os.path.join(ROOT, "tests", "fixtures", "checkpoint_v1", "v1_moe", "checkpoints", "step_00000003")
SHARD = "experts-ep000-of001.safetensors"

BODY = """
from moe.train.checkpoint import saving
from moe.train.resume import new_state, rng_state


cfg = config()
s = build_training(cfg, 1)
sampler = sampler_of(s, cfg)
state = new_state()
for n in (1, 2):
    step(s, sampler)
    state.update(step=n, sampler=sampler.state_dict(), rng=rng_state())
    saving.save(s.engine, os.path.join(OUT, "run", "checkpoints"), n, state, to_yaml(cfg), 2, 0)
"""


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, text_corpus, data_cache):
    out = run_engine_script(tmp_path_factory.mktemp("integrity"), BODY, text_corpus, data_cache)
    return os.path.join(out, "run")


@pytest.fixture
def run(saved_run, tmp_path):
    """A private copy of the saved run folder (checkpoints/step_00000001, step_00000002, latest)."""
    shutil.copytree(saved_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def v1(tmp_path):
    """A private copy of the committed format-1 step folder (no manifest, trainer.pt)."""
    shutil.copytree(V1_STEP, tmp_path / "step_00000003")
    return tmp_path / "step_00000003"


def _rewrite(file, change):
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": FORMAT})


def _remanifest(step):
    (step / "manifest.json").unlink()
    write_manifest(str(step))


# ------------------------------------------------------------------------------- reading a folder


def test_meta_headers_and_the_expert_index(v1):
    meta = read_meta(str(v1))
    assert (meta["format"], meta["version"], meta["step"]) == (FORMAT, 1, 3)
    assert shard_files(str(v1)) == [SHARD]
    shapes = headers(str(v1 / "model.safetensors"))
    assert shapes["embed.weight"] == [257, 32] == meta["tensors"]["embed.weight"]["shape"]
    index = expert_index(str(v1))
    assert len(index) == 2 * 4 * 2 * 3  # layers x experts x (w13, w2) x (weight + 2 moments)
    assert index["blocks.0.ffn.experts.3.w13"] == [SHARD] and index["exp_avg_sq/blocks.1.ffn.experts.0.w2"] == [SHARD]
    t = read_tensors(str(v1 / SHARD), ["blocks.0.ffn.experts.3.w13"])
    assert list(t) == ["blocks.0.ffn.experts.3.w13"] and list(t["blocks.0.ffn.experts.3.w13"].shape) == \
        meta["experts"]["blocks.0.ffn.experts"]["tensors"]["w13"]


def test_a_folder_that_is_not_a_checkpoint(tmp_path, v1):
    with pytest.raises(CheckpointError, match=f"^{tmp_path}: no meta.json \\(not a checkpoint written by moe train\\)$"):
        read_meta(str(tmp_path))
    assert verify(str(tmp_path)) == [f"{tmp_path}: no meta.json (not a checkpoint written by moe train)"]
    (v1 / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"meta.json: unreadable \(JSONDecodeError"):
        read_meta(str(v1))
    (v1 / "meta.json").write_text(json.dumps({"format": "other", "version": 1}))
    assert verify(str(v1)) == [f"{v1}/meta.json: format ('other', 1), expected 'moe-layout-free' version 1 or 2"]
    (v1 / "meta.json").write_text("[]")
    with pytest.raises(CheckpointError, match="format list, expected"):
        read_meta(str(v1))


def test_a_file_that_is_not_safetensors_is_named(v1):
    (v1 / SHARD).write_bytes(b"\x00" * 64)
    for read in (headers, read_tensors):
        with pytest.raises(CheckpointError, match=f"^{v1}/{SHARD}: not a readable safetensors file"):
            read(str(v1 / SHARD))
    assert any(p.startswith(f"{v1}/{SHARD}: not a readable safetensors file") for p in verify(str(v1)))


def test_all_finite():
    assert all_finite(torch.tensor([1.0, -2.0, 3e38]))
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert not all_finite(torch.tensor([1.0, bad, 2.0]))


# ---------------------------------------------------------------------------------- verify, v1


def test_the_format1_fixture_verifies(v1):
    assert verify(str(v1)) == []  # no manifest to check in format 1


def test_a_missing_expert_is_named(v1):
    _rewrite(v1 / SHARD, lambda t: t.pop("blocks.1.ffn.experts.2.w13"))
    assert verify(str(v1)) == ["missing blocks.1.ffn.experts expert 2 w13"]


def test_a_duplicated_or_unexpected_expert_tensor_is_named(v1):
    shutil.copy(v1 / SHARD, v1 / "experts-ep001-of002.safetensors")
    problems = verify(str(v1))
    assert len(problems) == 48  # every expert tensor of both layers, weights and moments
    assert problems[0] == f"duplicated blocks.0.ffn.experts expert 0 w13 (in {SHARD}, experts-ep001-of002.safetensors)"
    os.unlink(v1 / "experts-ep001-of002.safetensors")
    _rewrite(v1 / SHARD, lambda t: t.update({"blocks.0.ffn.experts.4.w13": torch.zeros(64, 32)}))
    assert verify(str(v1)) == [f"unexpected tensor blocks.0.ffn.experts.4.w13 in {SHARD}"]


def test_shapes_are_checked_against_meta_json(v1):
    _rewrite(v1 / SHARD, lambda t: t.update({"exp_avg/blocks.0.ffn.experts.1.w2": torch.zeros(32, 8)}))
    assert verify(str(v1)) == [f"blocks.0.ffn.experts expert 1 exp_avg/w2 in {SHARD} has shape [32, 8], expected [32, 32]"]
    shutil.copytree(V1_STEP, v1, dirs_exist_ok=True)
    meta = json.loads((v1 / "meta.json").read_text())
    meta["tensors"]["norm.weight"]["shape"] = [31]
    (v1 / "meta.json").write_text(json.dumps(meta))
    assert verify(str(v1)) == [
        "model.safetensors: norm.weight has shape [32], meta.json says [31]",
        "optimizer.safetensors: exp_avg/norm.weight has shape [32], expected [31]",
        "optimizer.safetensors: exp_avg_sq/norm.weight has shape [32], expected [31]"]


def test_missing_files_are_named(v1):
    os.unlink(v1 / "optimizer.safetensors")
    os.unlink(v1 / "trainer.pt")
    assert verify(str(v1)) == [f"{v1}/optimizer.safetensors: missing", f"{v1}/trainer.pt: missing"]


def test_a_missing_moment_is_named(v1):
    _rewrite(v1 / "optimizer.safetensors", lambda t: t.pop("exp_avg/blocks.0.attn.qkv.weight"))
    assert verify(str(v1)) == ["optimizer.safetensors: missing exp_avg/blocks.0.attn.qkv.weight"]


def test_the_step_must_agree_everywhere(v1, tmp_path):
    state = json.loads((v1 / "train_state.json").read_text())
    state["step"] = 4
    (v1 / "train_state.json").write_text(json.dumps(state))
    assert verify(str(v1)) == [f"{v1}: the step differs between meta.json (3), the folder name (3), trainer.pt (3), "
                               f"train_state.json (4)"]
    (v1 / "train_state.json").write_text("{")
    assert verify(str(v1)) == [f"{v1}/train_state.json: unreadable (JSONDecodeError)"]


def test_the_config_must_be_there_and_read_as_a_config(v1):
    (v1 / "config.yaml").write_text("model:\n  d_model: [1, 2\n")
    (problem,) = verify(str(v1))
    assert problem.startswith(f"{v1}/config.yaml: not a readable config (")
    (v1 / "config.yaml").write_text("model:\n  no_such_key: 1\n")
    assert "no_such_key" in verify(str(v1))[0]
    os.unlink(v1 / "config.yaml")
    assert verify(str(v1)) == [f"{v1}/config.yaml: missing"]


def test_a_nan_is_named_by_file_and_tensor(v1):
    _rewrite(v1 / SHARD, lambda t: t["blocks.1.ffn.experts.0.w2"].view(-1).__setitem__(5, float("nan")))
    assert verify(str(v1)) == [f"{v1}/{SHARD}: blocks.1.ffn.experts.0.w2 has 1 non-finite values"]
    assert verify(str(v1), finite=False) == []


# ---------------------------------------------------------------------------------- verify, v2


def test_a_saved_folder_verifies_with_its_manifest(run):
    step = run / "checkpoints" / "step_00000002"
    assert verify(str(step)) == []
    os.unlink(step / "manifest.json")
    assert verify(str(step)) == [f"{step}/manifest.json: missing (the folder cannot be checked for corruption)"]
    assert verify(str(step), checksums=False) == []


def test_a_flipped_byte_is_named_and_the_tensors_are_not_trusted(run):
    step = run / "checkpoints" / "step_00000002"
    data = bytearray((step / "optimizer.safetensors").read_bytes())
    data[-4:] = b"\xff\xff\xff\x7f"  # a NaN in the last moment, and a changed checksum
    (step / "optimizer.safetensors").write_bytes(bytes(data))
    # the checksum problem only: a folder that fails its checksums is not read for finiteness
    assert verify(str(step)) == [f"{step}/optimizer.safetensors: corrupt (SHA-256 differs from manifest.json)"]
    assert verify(str(step), checksums=False) != []


def test_a_missing_expert_with_a_matching_manifest_is_named(run):
    step = run / "checkpoints" / "step_00000002"
    _rewrite(step / SHARD, lambda t: t.pop("exp_avg_sq/blocks.0.ffn.experts.3.w2"))
    _remanifest(step)
    assert verify(str(step)) == ["missing blocks.0.ffn.experts expert 3 exp_avg_sq/w2"]


def test_a_nan_with_a_matching_manifest_is_named(run):
    step = run / "checkpoints" / "step_00000002"
    _rewrite(step / "optimizer.safetensors", lambda t: t["exp_avg/embed.weight"].view(-1).__setitem__(0, float("inf")))
    _remanifest(step)
    assert verify(str(step)) == [f"{step}/optimizer.safetensors: exp_avg/embed.weight has 1 non-finite values"]


def test_an_added_file_is_named(run):
    step = run / "checkpoints" / "step_00000002"
    (step / "notes.txt").write_text("x")
    assert verify(str(step)) == [f"{step}/notes.txt: not listed in manifest.json (added after the save)"]


# ------------------------------------------------------------------------ choosing where to resume


def test_latest_is_used_as_it_is(run):
    ckpt = run / "checkpoints"
    assert find_resume(str(ckpt)) == ("step_00000002", None)
    (ckpt / "step_00000002" / "notes.txt").write_text("x")
    assert find_resume(str(ckpt)) == ("step_00000002", None)  # not skipped silently: loading it refuses


def test_without_latest_the_newest_verified_step(run):
    ckpt = run / "checkpoints"
    os.unlink(ckpt / "latest")
    assert find_resume(str(ckpt)) == ("step_00000002", f"{ckpt}/latest is missing; resuming from step_00000002, "
                                                       f"the newest complete and verified step folder")
    (ckpt / "step_00000002" / "notes.txt").write_text("x")
    tag, note = find_resume(str(ckpt))
    assert tag == "step_00000001"
    assert note == (f"{ckpt}/latest is missing; resuming from step_00000001, the newest complete and verified step "
                    f"folder (skipped step_00000002: {ckpt}/step_00000002/notes.txt: not listed in manifest.json "
                    f"(added after the save))")
    write_latest(str(ckpt), "step_00000009")  # dangling
    assert find_resume(str(ckpt))[1].startswith(f"{ckpt}/latest points to 'step_00000009', which is not a step "
                                                f"folder here; resuming from step_00000001")


def test_no_step_folder_verifies(run):
    ckpt = run / "checkpoints"
    os.unlink(ckpt / "latest")
    for tag in ("step_00000001", "step_00000002"):
        os.unlink(ckpt / tag / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"latest is missing, and no step folder in {ckpt} verifies "
                                              r"\(step_00000002, step_00000001\): .*step_00000001/model.safetensors"):
        find_resume(str(ckpt))


def test_no_checkpoint_or_vanished_ones(tmp_path):
    assert find_resume(str(tmp_path / "nowhere")) == (None, None)
    assert find_resume(str(tmp_path)) == (None, None)
    write_latest(str(tmp_path), "step_00000004")
    with pytest.raises(CheckpointError, match="there is no step folder: the checkpoints are gone; move"):
        find_resume(str(tmp_path))


def test_resolve_step_dir_from_a_step_a_checkpoints_or_a_run_folder(run, tmp_path, capsys, v1):
    ckpt = run / "checkpoints"
    step = str(ckpt / "step_00000001")
    assert resolve_step_dir(step) == step
    assert resolve_step_dir(str(v1)) == str(v1)
    assert resolve_step_dir(str(ckpt)) == str(ckpt / "step_00000002")
    assert resolve_step_dir(str(run)) == str(ckpt / "step_00000002")
    assert capsys.readouterr().out == ""
    os.unlink(ckpt / "latest")
    assert resolve_step_dir(str(run)) == str(ckpt / "step_00000002")
    assert capsys.readouterr().out.startswith(f"note: {ckpt}/latest is missing; resuming from step_00000002")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / integrity.LEGACY_MODEL_FILE).write_bytes(b"")
    assert resolve_step_dir(str(legacy)) == str(legacy)
    with pytest.raises(CheckpointNotFound, match=f"^{tmp_path}/empty: not a checkpoint \\(no meta.json\\) and no "
                                                 f"checkpoints/latest$"):
        (tmp_path / "empty").mkdir()
        resolve_step_dir(str(tmp_path / "empty"))
