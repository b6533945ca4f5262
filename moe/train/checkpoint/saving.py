"""Saving a step folder: gather every tensor full-size under its global name (experts one by one),
refuse anything non-finite on every rank, write under a temporary name, fsync, rename, point
`latest` at it, prune older folders (the format is described in moe/train/checkpoint/__init__.py)."""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from moe.errors import CheckpointError, TrainingDiverged
from moe.io import fsync_dir
from moe.parallel import EXPERT_PARAM_NAMES, expert_layout, model_groups, moe_layers
from moe.train.checkpoint.optimizer_state import OptimizerState
from moe.train.checkpoint.folders import FORMAT, TRAINER, VERSION, problems_brief, prune, step_tag, write_latest
from moe.train.checkpoint.manifest import write_manifest
from moe.train.checkpoint.trainer_state import trainer_json
from moe.train.checkpoint.integrity import all_finite, verify


def shard_name(ep_rank: int, ep_size: int) -> str:
    return f"experts-ep{ep_rank:03d}-of{ep_size:03d}.safetensors"


def model_tensors(model: torch.nn.Module):
    """(unique parameters in order with their canonical name, aliases {name: canonical}, persistent
    buffers {name: tensor}, expert layers {layer prefix: experts module})."""
    names = {id(m): n for n, m in model.named_modules()}
    expert_layers = {names[id(layer.experts)]: layer.experts for layer in moe_layers(model)}
    expert_ids = {id(getattr(ex, t)) for ex in expert_layers.values() for t in EXPERT_PARAM_NAMES}
    params: List[Tuple[str, torch.nn.Parameter]] = []
    canonical: Dict[int, str] = {}
    for name, p in model.named_parameters():
        canonical[id(p)] = name
        params.append((name, p))
    aliases, buffers = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, torch.nn.Parameter):
            if canonical.get(id(t), name) != name:
                aliases[name] = canonical[id(t)]
        else:
            buffers[name] = t
    dense = [(n, p) for n, p in params if id(p) not in expert_ids]
    return dense, aliases, buffers, expert_layers


def expert_meta(expert_layers) -> Dict[str, Any]:
    out = {}
    for prefix, ex in expert_layers.items():
        _, _, E = expert_layout(ex)
        out[prefix] = {"num_experts": E,
                       "tensors": {t: list(getattr(ex, t).shape[1:]) for t in EXPERT_PARAM_NAMES}}
    return out


def save(engine, ckpt_dir: str, step: int, train_state: Dict[str, Any], config_yaml: str, keep_last: int,
         rank: int) -> str:
    """Write step `step` (a collective: call on every rank). Returns the tag. Nothing non-finite is
    ever written: every rank checks the tensors it gathered and all agree before any file is made."""
    tag = step_tag(step)
    tmp_path = os.path.join(ckpt_dir, f".tmp-{tag}")
    model = engine.module
    opt = OptimizerState(engine)
    weights, moments, shard = _gather(model, opt)
    _agree_finite(step, weights, moments, shard)
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(tmp_path, ignore_errors=True)
        os.makedirs(tmp_path)
    dist.barrier()
    try:
        _write_step(engine, tmp_path, step, train_state, config_yaml, rank, opt, weights, moments, shard)
    except Exception:
        if rank == 0:
            shutil.rmtree(tmp_path, ignore_errors=True)
        raise
    dist.barrier()
    if rank == 0:
        _publish(ckpt_dir, tmp_path, tag, step, keep_last)
    dist.barrier()
    return tag


def _gather(model, opt: "OptimizerState"):
    """Full fp32 masters and moments: dense ones (for rank 0) and this rank's expert shard. Every
    rank takes part in the (possibly collective) reads, in the same order."""
    dense, _, buffers, expert_layers = model_tensors(model)
    weights: Dict[str, torch.Tensor] = {}
    moments: Dict[str, torch.Tensor] = {}
    for name, p in dense:
        weights[name] = opt.get_master(p)
        for k, v in opt.get_moments(p).items():
            moments[f"{k}/{name}"] = v
    for name, buf in buffers.items():
        weights[name] = buf.detach().cpu().contiguous()
    shard: Dict[str, torch.Tensor] = {}
    for prefix, ex in expert_layers.items():
        offset, local, _ = expert_layout(ex)
        for t in EXPERT_PARAM_NAMES:
            p = getattr(ex, t)
            master = opt.get_master(p)
            moms = opt.get_moments(p)
            for i in range(local):
                key = f"{prefix}.{offset + i}.{t}"
                shard[key] = master[i].contiguous()
                for k, v in moms.items():
                    shard[f"{k}/{key}"] = v[i].contiguous()
    return weights, moments, shard


def _agree_finite(step: int, *tensor_dicts: Dict[str, torch.Tensor]) -> None:
    bad = [k for d in tensor_dicts for k, v in d.items() if v.is_floating_point() and v.numel() and not all_finite(v)]
    flag = torch.tensor([len(bad)], dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag)
    if int(flag) > 0:
        where = f" (here: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''})" if bad else ""
        raise TrainingDiverged(f"step {step}: {int(flag)} tensors hold non-finite values{where}; "
                               f"no checkpoint was written")


def _write_step(engine, tmp_path: str, step: int, train_state: Dict[str, Any], config_yaml: str, rank: int,
                opt: "OptimizerState", weights, moments, shard) -> None:
    model = engine.module
    groups = model_groups(model)
    ep_rank, ep_size = (groups.ep_rank, groups.ep_size) if groups else (0, 1)
    if groups is None or groups.edp_rank == 0:
        _save_tensors(shard, os.path.join(tmp_path, shard_name(ep_rank, ep_size)),
                      {"format": FORMAT, "ep_rank": str(ep_rank), "ep_size": str(ep_size)})
    if rank != 0:
        return
    _, aliases, buffers, expert_layers = model_tensors(model)
    _save_tensors(weights, os.path.join(tmp_path, "model.safetensors"), {"format": FORMAT})
    _save_tensors(moments, os.path.join(tmp_path, "optimizer.safetensors"), {"format": FORMAT})
    meta = {
        "format": FORMAT, "version": VERSION, "step": step,
        "saved_with": {"world_size": dist.get_world_size(), "ep_size": ep_size,
                       "zero_stage": engine.zero_optimization_stage(),
                       "dtype": str(next(model.parameters()).dtype).replace("torch.", "")},
        "tensors": {n: {"shape": list(weights[n].shape), "kind": "buffer" if n in buffers else "param"}
                    for n in weights},
        "aliases": aliases,
        "experts": expert_meta(expert_layers),
        "expert_shards": ep_size,
        "optimizer": {"moments": opt.keys if opt.has_state() else [], "step": opt.step_count()},
    }
    sched = engine.lr_scheduler
    counters = {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                "skipped_steps": engine.skipped_steps}
    files = {"meta.json": json.dumps(meta, indent=1),
             TRAINER: trainer_json(train_state, sched.state_dict() if sched is not None else None, counters),
             "config.yaml": config_yaml,
             "train_state.json": json.dumps({k: v for k, v in train_state.items() if k != "rng"}, indent=2)}
    for name, text in files.items():
        with open(os.path.join(tmp_path, name), "w") as f:
            f.write(text)


def _save_tensors(tensors: Dict[str, torch.Tensor], file: str, metadata: Dict[str, str]) -> None:
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, file, metadata=metadata)
    except OSError:
        raise
    except Exception as exc:  # safetensors reports a full disk as its own error type, without the path
        raise CheckpointError(f"writing {file} failed: {exc}") from None


def _publish(ckpt_dir: str, tmp_path: str, tag: str, step: int, keep_last: int) -> None:
    """Check the folder just written, checksum it, rename it into place, point `latest` at it, prune.
    Each stage is durable (fsync) before the next, so a crash at any moment leaves `latest` naming
    a complete folder."""
    # finiteness was checked on the tensors before writing; the checksums are made next
    problems = verify(tmp_path, finite=False, checksums=False)
    if problems:
        raise CheckpointError(f"{tmp_path}: the checkpoint just written is inconsistent: {problems_brief(problems)}")
    write_manifest(tmp_path)
    final = os.path.join(ckpt_dir, tag)
    if os.path.exists(final):  # same step saved again (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp_path, final)
    fsync_dir(ckpt_dir)
    write_latest(ckpt_dir, tag)
    prune(ckpt_dir, step, keep_last)

