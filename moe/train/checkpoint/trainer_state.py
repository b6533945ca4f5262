"""trainer.json: the resumable train state, RNG states (bit exact), LR scheduler and engine counters as
JSON. Format 1's pickled trainer.pt is still read, with `torch.load(weights_only=True)` and an
allow-list of the numpy types its RNG state holds, so a planted object is refused, not run."""
from __future__ import annotations

import base64
import json
import os
from typing import Any, Dict, Optional

import numpy as np
import torch

from moe.errors import CheckpointError
from moe.train.checkpoint.folders import TRAINER, TRAINER_V1


def encode_rng(state: Dict[str, Any]) -> Dict[str, Any]:
    """Python's, numpy's and torch's generator states as JSON values (bit exact)."""
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    return {"python": [version, list(internal), gauss],
            "numpy": [name, np.asarray(keys, dtype=np.uint32).tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": base64.b64encode(state["torch"].numpy().tobytes()).decode()}


def decode_rng(state: Dict[str, Any]) -> Dict[str, Any]:
    if not isinstance(state.get("torch"), str):  # format 1: the objects themselves
        return state
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    torch_state = torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8).clone()
    return {"python": (version, tuple(internal), gauss),
            "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
            "torch": torch_state}


def _plain(value: Any) -> Any:
    """numpy scalars and tuples as JSON values; anything else that JSON cannot hold is a bug here."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in {TRAINER}")


def trainer_json(train_state: Dict[str, Any], scheduler: Optional[Dict[str, Any]],
                 engine_counters: Dict[str, int]) -> str:
    state = dict(train_state)
    if "rng" in state:
        state["rng"] = encode_rng(state["rng"])
    return json.dumps({"train_state": _plain(state), "scheduler": _plain(scheduler),
                       "engine": _plain(engine_counters)}, indent=1, allow_nan=False)


def read_trainer(path: str) -> Dict[str, Any]:
    """{train_state, scheduler, engine} of a step folder, format 2 (JSON) or 1 (pickle, read safely)."""
    json_path = os.path.join(path, TRAINER)
    if os.path.isfile(json_path):
        try:
            with open(json_path) as f:
                trainer = json.load(f)
            trainer["train_state"]["rng"] = decode_rng(trainer["train_state"]["rng"])
            return trainer
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{json_path}: unreadable ({type(exc).__name__}: {exc})") from None
    pt_path = os.path.join(path, TRAINER_V1)
    if not os.path.isfile(pt_path):
        raise CheckpointError(f"{path}: no {TRAINER} (nor the {TRAINER_V1} of format 1)")
    return safe_torch_load(pt_path)


def _numpy_globals() -> list:
    """What a pickled numpy RNG state needs: array reconstruction and the uint32 dtype, nothing
    that can call arbitrary code."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_torch_load(path: str) -> Any:
    """torch.load that runs no code: tensors, containers, numbers, strings and numpy arrays only.
    Anything else in the pickle (a planted object) is refused with an error naming the file."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for a refused global; others for a corrupt file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused to load: it holds something other than tensors and plain data, "
                              f"or is corrupt ({first[:300]})") from None
