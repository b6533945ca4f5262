"""Resuming a run: the train state saved with each checkpoint, and the RNG states inside it.

Everything needed to continue (step, tokens, FLOPs, wall time, sampler position, RNG states, W&B run
id) is one train-state dict saved with each checkpoint; model, optimizer and scheduler are restored
by the checkpoint module from the same folder.
"""
from __future__ import annotations

import os
import random
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from moe.config import Config
from moe.errors import CheckpointError
from moe.train.checkpoint import integrity, loading
def new_state() -> Dict[str, Any]:
    """The train state of a run that has not taken a step yet."""
    return {"step": 0, "tokens": 0, "flops": 0.0, "wall_s": 0.0, "wandb_id": None}


def rng_state() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def resume(cfg: Config, engine, optimizer, scheduler, sampler, ckpt_dir: str,
           rank: int) -> Tuple[Dict[str, Any], Optional[str]]:
    """(train state, tag resumed from or None). `latest`, or with it missing or dangling the newest
    verified step folder (said on rank 0); the checkpoint is verified before anything is restored."""
    if not cfg.checkpoint.resume:
        return new_state(), None
    tag, note = integrity.find_resume(ckpt_dir)
    if tag is None:
        return new_state(), None
    if note and rank == 0:
        print(f"[moe] {note}", flush=True)
    state = loading.load(engine, ckpt_dir, tag)
    # The optimizer restores the LR it last used, which came from the schedule of the saved run;
    # recompute it from this run's schedule so that extending train.steps continues correctly.
    for group, lr in zip(optimizer.param_groups, [base * scheduler.lr_lambdas[0](scheduler.last_epoch)
                                                  for base in scheduler.base_lrs]):
        group["lr"] = lr
    try:
        sampler.load_state_dict(state["sampler"])
    except ValueError as exc:  # resumed onto other data: data.dataset <-> data.sources, seq_len, seed
        raise CheckpointError(f"{os.path.join(ckpt_dir, tag)} does not fit this run's data: {exc}") from None
    set_rng_state(state["rng"])
    return state, tag
