"""Loading a step folder at any layout: verify it once (rank 0, all ranks refuse together), then each
rank reads the tensors it holds (the experts of its expert-parallel rank from whichever shard has
them) and writes them into the engine; also the consolidated EP=1 state dict and `export`. Folders
in DeepSpeed's own older format load through the engine after every file passed the safe loader."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from moe.errors import CheckpointError, CheckpointNotFound
from moe.parallel import EXPERT_PARAM_NAMES, expert_layout, model_groups
from moe.train.checkpoint.optimizer_state import OptimizerState
from moe.train.checkpoint.saving import expert_meta, model_tensors
from moe.train.checkpoint.folders import LEGACY_MODEL_FILE, problems_brief
from moe.train.checkpoint.trainer_state import read_trainer, safe_torch_load
from moe.train.checkpoint.integrity import expert_index, find_resume, read_meta, read_tensors, resolve_step_dir, verify


def _read_tensors(path: str, file: str, keys) -> Dict[str, torch.Tensor]:
    return read_tensors(os.path.join(path, file), keys)


def _global_experts(path: str, meta: Dict[str, Any], prefix: str = "") -> Dict[str, torch.Tensor]:
    """{`<layer>.<t>`: stacked [E, ...] tensor} (prefix `exp_avg/` etc. for a moment)."""
    index = expert_index(path)
    out = {}
    for layer, info in meta["experts"].items():
        for t in info["tensors"]:
            keys = [f"{prefix}{layer}.{e}.{t}" for e in range(info["num_experts"])]
            parts = []
            for k in keys:
                parts.append(_read_tensors(path, index[k][0], [k])[k])
            out[f"{prefix}{layer}.{t}"] = torch.stack(parts)
    return out


def consolidated_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The EP=1 model state dict (stacked expert weights, tied aliases filled in) of a step folder."""
    meta = read_meta(path)
    problems = verify(path)
    if problems:
        raise CheckpointError(f"{path}: {problems_brief(problems, 10)}")
    state = read_tensors(os.path.join(path, "model.safetensors"))
    state.update(_global_experts(path, meta))
    for alias, target in meta["aliases"].items():
        state[alias] = state[target]
    return state


def export(path: str, out: str) -> Dict[str, Any]:
    """Write the consolidated state dict as one safetensors file (metadata: step, config)."""
    path = resolve_step_dir(path)
    state = consolidated_state_dict(path)
    meta = read_meta(path)
    unique: Dict[str, torch.Tensor] = {k: v for k, v in state.items() if k not in meta["aliases"]}
    config = open(os.path.join(path, "config.yaml")).read() if os.path.isfile(os.path.join(path, "config.yaml")) else ""
    save_file({k: v.contiguous() for k, v in unique.items()}, out,
              metadata={"format": "moe-export", "step": str(meta["step"]), "config": config,
                        "aliases": json.dumps(meta["aliases"])})
    return {"tensors": len(unique), "params": int(sum(v.numel() for v in unique.values())), "step": meta["step"]}


def check_compatible(engine, path: str, meta: Dict[str, Any]) -> None:
    """CheckpointError naming every tensor the model and the checkpoint disagree on."""
    dense, aliases, buffers, expert_layers = model_tensors(engine.module)
    problems = []
    want = {n: list(p.shape) for n, p in dense}
    want.update({n: list(b.shape) for n, b in buffers.items()})
    have = {n: info["shape"] for n, info in meta["tensors"].items()}
    for n in sorted(set(want) - set(have)):
        problems.append(f"missing {n}")
    for n in sorted(set(have) - set(want)):
        problems.append(f"unexpected {n}")
    for n in sorted(set(want) & set(have)):
        if want[n] != have[n]:
            problems.append(f"{n}: checkpoint {have[n]}, model {want[n]}")
    ours = expert_meta(expert_layers)
    for layer in sorted(set(ours) | set(meta["experts"])):
        a, b = meta["experts"].get(layer), ours.get(layer)
        if a != b:
            problems.append(f"{layer}: checkpoint has {a and a['num_experts']} experts {a and a['tensors']}, "
                            f"model {b and b['num_experts']} experts {b and b['tensors']}")
    if problems:
        raise CheckpointError(f"{path} does not fit this model ({len(problems)} differences): "
                              + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))


def load(engine, ckpt_dir: str, tag: str) -> Dict[str, Any]:
    """Restore weights, router state, optimizer moments, scheduler and engine counters from a step
    folder saved at any layout; returns the TrainState. A collective (call on every rank). Nothing on
    disk is written; every check runs before any state is changed."""
    path = os.path.join(ckpt_dir, tag)
    if not os.path.isfile(os.path.join(path, "meta.json")) and os.path.isfile(os.path.join(path, LEGACY_MODEL_FILE)):
        return _load_legacy(engine, ckpt_dir, tag)
    verify_once(path)
    meta = read_meta(path)
    check_compatible(engine, path, meta)

    model = engine.module
    dense, _, buffers, expert_layers = model_tensors(model)
    opt = OptimizerState(engine)
    keys = meta["optimizer"]["moments"]
    if keys:
        opt.prepare(meta["optimizer"]["step"], keys)
    weights = read_tensors(os.path.join(path, "model.safetensors"))
    moments = read_tensors(os.path.join(path, "optimizer.safetensors")) if keys else {}
    for name, p in dense:
        opt.set(p, weights[name], {k: moments[f"{k}/{name}"] for k in keys})
    with torch.no_grad():
        for name, buf in buffers.items():
            buf.copy_(weights[name].to(buf.device, buf.dtype))
    index = expert_index(path)
    for prefix, ex in expert_layers.items():
        offset, local, _ = expert_layout(ex)
        for t in EXPERT_PARAM_NAMES:
            def stacked(pre: str) -> torch.Tensor:
                ks = [f"{pre}{prefix}.{offset + i}.{t}" for i in range(local)]
                by_file: Dict[str, List[str]] = defaultdict(list)
                for k in ks:
                    by_file[index[k][0]].append(k)
                got: Dict[str, torch.Tensor] = {}
                for f, fk in by_file.items():
                    got.update(_read_tensors(path, f, fk))
                return torch.stack([got[k] for k in ks])

            opt.set(getattr(ex, t), stacked(""), {k: stacked(f"{k}/") for k in keys})
    trainer = read_trainer(path)
    if engine.lr_scheduler is not None and trainer.get("scheduler") is not None:
        engine.lr_scheduler.load_state_dict(_fit_scheduler_state(trainer["scheduler"], engine.lr_scheduler))
    for k, v in trainer.get("engine", {}).items():
        setattr(engine, k, v)
    return trainer["train_state"]


def verify_once(path: str) -> None:
    """Rank 0 verifies the folder (checksums, structure, finiteness, step) before any state changes;
    every rank learns the verdict, so all refuse together. The cost is one read of the folder."""
    is_dist = dist.is_initialized() and dist.get_world_size() > 1
    problems = verify(path) if not is_dist or dist.get_rank() == 0 else []
    if is_dist:
        flag = torch.tensor([len(problems)], dtype=torch.int64)
        dist.broadcast(flag, src=0)
        if int(flag) and not problems:
            raise CheckpointError(f"{path} failed verification on rank 0 (its log names the problems)")
    if problems:
        raise CheckpointError(f"{path} is incomplete, corrupt or inconsistent ({len(problems)} problems): "
                              f"{problems_brief(problems, 8)}; run `moe ckpt verify {path}`")


def _fit_scheduler_state(state: Dict[str, Any], scheduler) -> Dict[str, Any]:
    """The scheduler's per-param-group lists (`base_lrs`, `_last_lr`) have one entry per optimizer
    group, and the number of groups depends on the layout (expert parallelism adds DeepSpeed's MoE
    groups). Every group follows the same schedule, so the lists are refitted to this optimizer."""
    state = dict(state)
    n = len(scheduler.optimizer.param_groups)
    for key in ("base_lrs", "_last_lr"):
        values = state.get(key)
        if isinstance(values, list) and len(values) != n:
            if len(set(values)) > 1:
                raise CheckpointError(f"the saved LR schedule has different {key} per parameter group ({values}); "
                                      f"it cannot be mapped onto {n} groups")
            state[key] = [values[0]] * n
    return state


def _load_legacy(engine, ckpt_dir: str, tag: str) -> Dict[str, Any]:
    if model_groups(engine.module) is not None:
        raise CheckpointError(
            f"{os.path.join(ckpt_dir, tag)} is in DeepSpeed's own format (written by an earlier version), which "
            f"cannot be loaded with parallel.ep_size > 1: resume it once with parallel.ep_size=1 (the next "
            f"checkpoint is layout-free)")
    _safe_scan_legacy(os.path.join(ckpt_dir, tag))
    _, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None or "train_state" not in client_state:
        raise CheckpointError(f"{os.path.join(ckpt_dir, tag)}: not a checkpoint written by moe train")
    return client_state["train_state"]


def _safe_scan_legacy(path: str) -> None:
    """DeepSpeed's loader unpickles without restriction. Each file is first read with the safe
    loader, which refuses anything but tensors and plain data: only a folder that passes is handed
    to DeepSpeed, so a planted object never runs."""
    for name in sorted(os.listdir(path)):
        if name.endswith(".pt"):
            safe_torch_load(os.path.join(path, name))


def load_model_weights(ckpt_dir: str, tag: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The EP=1 model state dict from a checkpoint, without DeepSpeed (for generate/eval)."""
    if tag is None:
        tag, note = find_resume(ckpt_dir)
        if note:
            print(f"note: {note}")
    if tag is None:
        raise CheckpointNotFound(f"no checkpoint in {ckpt_dir}")
    path = os.path.join(ckpt_dir, tag)
    if os.path.isfile(os.path.join(path, "meta.json")):
        return consolidated_state_dict(path)
    legacy = os.path.join(path, LEGACY_MODEL_FILE)
    if not os.path.isfile(legacy):
        raise CheckpointNotFound(f"{path}: not a checkpoint (no meta.json)")
    state = safe_torch_load(legacy)
    if not isinstance(state, dict) or "module" not in state:
        raise CheckpointError(f"{legacy}: no model weights (`module`) in it")
    return state["module"]

