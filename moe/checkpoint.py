"""Checkpoints: one DeepSpeed folder per step, written under a temporary name and renamed, then a
`latest` pointer replaced atomically, then old folders pruned. A crash mid-save leaves the previous
`latest` intact. The resolved config and the resumable train state are stored in every step folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional

import torch

STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def list_steps(ckpt_dir: str) -> List[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(m.group(1)) for m in map(STEP_DIR.match, os.listdir(ckpt_dir)) if m)


def latest_tag(ckpt_dir: str) -> Optional[str]:
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    if not STEP_DIR.match(tag) or not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise RuntimeError(f"{path} points to {tag!r}, which is not a complete checkpoint folder")
    return tag


def save(engine, ckpt_dir: str, step: int, train_state: Dict[str, Any], config_yaml: str, keep_last: int,
         rank: int) -> str:
    import torch.distributed as dist

    tag = step_tag(step)
    tmp_tag = f".tmp-{tag}"
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(os.path.join(ckpt_dir, tmp_tag), ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tmp_tag, client_state={"train_state": train_state}, save_latest=False)
    dist.barrier()
    if rank == 0:
        tmp_path = os.path.join(ckpt_dir, tmp_tag)
        with open(os.path.join(tmp_path, "config.yaml"), "w") as f:
            f.write(config_yaml)
        with open(os.path.join(tmp_path, "train_state.json"), "w") as f:
            json.dump({k: v for k, v in train_state.items() if k != "rng"}, f, indent=2)
        final = os.path.join(ckpt_dir, tag)
        if os.path.exists(final):  # same step saved again (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp_path, final)
        pointer = os.path.join(ckpt_dir, "latest")
        with open(pointer + ".tmp", "w") as f:
            f.write(tag)
        os.replace(pointer + ".tmp", pointer)
        for old in list_steps(ckpt_dir)[:-keep_last]:
            shutil.rmtree(os.path.join(ckpt_dir, step_tag(old)), ignore_errors=True)
    dist.barrier()
    return tag


def load(engine, ckpt_dir: str, tag: str) -> Dict[str, Any]:
    _, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None or "train_state" not in client_state:
        raise RuntimeError(f"{os.path.join(ckpt_dir, tag)}: not a checkpoint written by moe train")
    return client_state["train_state"]


def load_model_weights(ckpt_dir: str, tag: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The model's state dict from a checkpoint, without DeepSpeed (for generate/eval)."""
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (no `latest` file)")
    path = os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing model states")
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["module"]
