"""moe/train/resume.py: the RNG states round-trip, and a run without checkpoints starts at step 0."""
import random

import numpy as np
import torch

from moe.config import load_config
from moe.train.resume import new_state, resume, rng_state, set_rng_state
from tests.helpers import ROOT


def test_rng_state_round_trips_every_generator():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    saved = rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def test_nothing_to_resume_is_a_fresh_state(tmp_path):
    cfg = load_config(f"{ROOT}/experiments/debug_moe.yaml")
    assert resume(cfg, None, None, None, None, str(tmp_path / "checkpoints"), 0) == (new_state(), None)
    cfg.checkpoint.resume = False
    assert resume(cfg, None, None, None, None, str(tmp_path / "checkpoints"), 0) == (new_state(), None)
