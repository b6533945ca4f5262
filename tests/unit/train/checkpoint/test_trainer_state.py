"""moe/train/checkpoint/trainer_state.py: the train state as JSON, RNG states bit exact, nothing pickled."""
import json
import pickle
import random

import numpy as np
import pytest
import torch

from moe.errors import CheckpointError
from moe.train.checkpoint.trainer_state import decode_rng, encode_rng, read_trainer, safe_torch_load, trainer_json


def _rng():
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(2)
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def test_rng_states_survive_json_bit_exact():
    state = _rng()
    back = decode_rng(json.loads(json.dumps(encode_rng(state))))
    assert back["python"] == state["python"]
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(back["numpy"], state["numpy"]))
    assert torch.equal(back["torch"], state["torch"])


def test_trainer_json_round_trips_and_refuses_objects(tmp_path):
    text = trainer_json({"step": 4, "tokens": np.int64(1024), "rng": _rng()}, {"last_epoch": 4}, {"global_steps": 4})
    (tmp_path / "trainer.json").write_text(text)
    trainer = read_trainer(str(tmp_path))
    assert trainer["train_state"]["step"] == 4 and trainer["train_state"]["tokens"] == 1024
    assert trainer["scheduler"] == {"last_epoch": 4} and trainer["engine"] == {"global_steps": 4}
    with pytest.raises(TypeError, match="cannot store object"):
        trainer_json({"step": 1, "thing": object()}, None, {})
    with pytest.raises(ValueError):  # NaN is not JSON
        trainer_json({"step": 1, "loss": float("nan")}, None, {})


class _Planted:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_pickled_object_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "trainer.pt"
    path.write_bytes(pickle.dumps({"state": _Planted()}))
    with pytest.raises(CheckpointError, match="trainer.pt: refused to load"):
        safe_torch_load(str(path))
