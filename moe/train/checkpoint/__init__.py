"""Checkpoints in a layout-free format: a run saved at one parallel layout (world size, expert-parallel
size, ZeRO stage) resumes at another, with the same weights, router state and optimizer moments.

Folders. One folder per step (`step_00000040`), written under a temporary name (`.tmp-step_...`) and
renamed when complete, then a `latest` pointer replaced atomically, then folders older than the new
one pruned (`checkpoint.keep_last`; a newer folder is never pruned). Every file is fsync-ed before
its rename, so a crash or power loss at any moment leaves `latest` naming a complete folder. Nothing
non-finite is ever saved: the gathered tensors are checked on every rank first.

Contents of a step folder (every tensor full-size, fp32, under its global name):

    meta.json                     format, version, the layout it was saved at (informational), the
                                  model's tensors (name, global shape, kind), tied aliases, the expert
                                  layers (num_experts, per-expert shapes), optimizer moment keys, step
    model.safetensors             every non-expert parameter (the fp32 master when the model trains in
                                  bf16) and persistent buffer (router balancing state: expert_bias,
                                  global_load), by the model's state_dict names; tied weights once
    optimizer.safetensors         the non-expert Adam moments: `exp_avg/<name>`, `exp_avg_sq/<name>`
    experts-ep{p}-of{P}.safetensors  one shard per expert-parallel rank p of the saving run: for each
                                  MoE layer and each of its experts e, `<layer>.experts.<e>.w13`,
                                  `<layer>.experts.<e>.w2` and their moments `exp_avg/<...>`, ...
    trainer.json                  the resumable TrainState (step, tokens, sampler position, RNG states,
                                  W&B id), the LR scheduler and the engine's step counters, as JSON
                                  (format 1 had a pickled `trainer.pt`; it is still read, safely)
    config.yaml, train_state.json the resolved config and a readable copy of the TrainState
    manifest.json                 size and SHA-256 of every other file, and of itself (written last)

Checkpoints are data: nothing in a folder is unpickled (moe/train/checkpoint/store.py), loading verifies
the folder first (checksums, shapes, experts, finiteness, one step everywhere) and names the file
at fault.

Experts are stored one by one under their global expert id, so the number of shards and which rank
wrote which expert do not matter when loading: a rank at any EP size reads the experts it holds
from whatever shard has them (the shards' headers are an index). `verify` checks that every expert
of every layer is present exactly once with consistent shapes; `export` writes the EP=1 state dict
(stacked [E, ...] expert weights) as one safetensors file.

Why not DeepSpeed's checkpoints. `engine.save_checkpoint` on a model with MoE layers writes experts
through `_save_moe_checkpoint`, which expects one module per expert named
`.deepspeed_moe.experts.deepspeed_experts.N` and breaks on our stacked weights; its optimizer state
is one file per data-parallel rank (ZeRO partitions, or a full copy), bound to the world size and EP
size it was written at. Here every rank reads its parameters' full fp32 masters and moments through
DeepSpeed's tensor-fragment API (`safe_get_full_fp32_param`, `safe_get_full_optimizer_state`: an
all-reduce over the parameter's data-parallel group, which is the expert-data-parallel group for
experts) or directly from the optimizer without ZeRO; rank 0 writes the non-expert tensors and the
ranks of the first EP group (expert-data-parallel rank 0) write the expert shards. Loading writes
each rank's slice back through the same API.

Checkpoints written by earlier versions in DeepSpeed's own format (`mp_rank_00_model_states.pt`)
still load, through the engine, when expert parallelism is off, and only after every file in the
folder has passed the safe loader (tensors and plain data only), since DeepSpeed's loader unpickles.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

import torch

from moe.train.checkpoint.store import (  # noqa: F401  (re-exported: the CLI, inference and tests use them)
    FORMAT, LEGACY_MODEL_FILE, STEP_DIR, TRAINER, VERSION, all_finite, expert_index, find_resume, latest_tag, list_steps,
    read_latest, remove_leftovers,
    problems_brief, prune, read_meta, read_tensors, read_trainer, resolve_step_dir, safe_torch_load, shard_files,
    step_tag, trainer_json, verify, write_latest, write_manifest)
from moe.errors import CheckpointError, CheckpointNotFound, TrainingDiverged
from moe.io import fsync_dir


def shard_name(ep_rank: int, ep_size: int) -> str:
    return f"experts-ep{ep_rank:03d}-of{ep_size:03d}.safetensors"


# ------------------------------------------------------------------------------ optimizer access


class OptimizerState:
    """Full fp32 master weights and Adam moments of the model's parameters, whatever DeepSpeed wrapped
    the optimizer in. `get_*` may be collectives (ZeRO): call them on every rank, for every parameter,
    in the same order."""

    def __init__(self, engine) -> None:
        self.engine = engine
        opt = engine.optimizer
        self.opt = opt
        if hasattr(opt, "single_partition_of_fp32_groups") or hasattr(opt, "fp32_groups_flat_partition"):
            self.kind = "fragments"  # ZeRO 1/2 or BF16_Optimizer: partitioned flat fp32 buffers
            self.inner = opt.optimizer
            self.flats = list(getattr(opt, "single_partition_of_fp32_groups", None)
                              or getattr(opt, "fp32_groups_flat_partition"))
            if self.has_state():
                self._relink()
        elif hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):
            self.kind = "wrapped"  # bf16/fp16 without ZeRO: fp32 copies next to the model's params
            self.inner = opt.optimizer
            self.master = {id(lp): hp for lg, hg in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lg, hg)}
        else:
            self.kind = "plain"  # a torch optimizer on the model's own (fp32) parameters
            self.inner = opt
        self.keys = self._moment_keys()

    def _relink(self) -> None:
        """(Re)build the parameters' views into the optimizer state. DeepSpeed 0.19 links them once,
        right after the step of the first parameter group, when the torch optimizer has not yet
        created the state of the other groups: their views then lack the moments (`exp_avg not
        found in optimizer state fragment`). Views only; nothing is copied."""
        self.opt._hp_optimizer_states_linked = False
        self.opt._lazy_init_hp_params_optimizer_state()

    def _moment_keys(self) -> List[str]:
        for state in self.inner.state.values():
            keys = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0)
            if keys:
                return keys
        return ["exp_avg", "exp_avg_sq"]

    def _hp(self, p: torch.Tensor) -> torch.Tensor:
        return self.master[id(p)] if self.kind == "wrapped" else p

    def has_state(self) -> bool:
        return any(len(state) > 0 for state in self.inner.state.values())

    def get_master(self, p: torch.Tensor) -> torch.Tensor:
        if self.kind == "fragments":
            from deepspeed.utils import safe_get_full_fp32_param

            return safe_get_full_fp32_param(p).detach().float().cpu()
        return self._hp(p).detach().float().cpu()

    def get_moments(self, p: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not self.has_state():
            return {}
        if self.kind == "fragments":
            from deepspeed.utils import safe_get_full_optimizer_state

            return {k: safe_get_full_optimizer_state(p, k).detach().float().cpu() for k in self.keys}
        hp = self._hp(p)
        state = self.inner.state.get(hp, {})  # a parameter that never had a gradient has no state yet
        return {k: (state[k] if k in state else torch.zeros_like(hp)).detach().float().cpu() for k in self.keys}

    def step_count(self) -> int:
        for state in self.inner.state.values():
            if "step" in state:
                return int(float(state["step"]))
        return 0

    def set(self, p: torch.Tensor, master: torch.Tensor, moments: Dict[str, torch.Tensor]) -> None:
        """Set the parameter (and its fp32 master) and its moments from full-size tensors."""
        with torch.no_grad():
            p.data.copy_(master.to(p.device, p.dtype))
            if self.kind == "fragments":
                from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

                safe_set_full_fp32_param(p, master.to(p.device, torch.float32))
                for k, v in moments.items():
                    safe_set_full_optimizer_state(p, v.to(p.device, torch.float32), k)
                return
            hp = self._hp(p)
            if hp is not p:
                hp.data.copy_(master.to(hp.device, hp.dtype))
            if moments:
                state = self.inner.state[hp]
                for k, v in moments.items():
                    state[k] = v.to(hp.device, hp.dtype).clone()

    def prepare(self, step: int, keys: List[str]) -> None:
        """Create the optimizer state (torch optimizers create it lazily at their first step) with the
        saved step count, so moments can be written into it."""
        if self.kind == "fragments":
            targets = self.flats
        else:
            targets = [self._hp(p) for g in self.inner.param_groups for p in g["params"]]
        for t in targets:
            state = self.inner.state[t]
            state["step"] = torch.tensor(float(step), dtype=torch.float32)
            for k in keys:
                if k not in state:
                    state[k] = torch.zeros_like(t, memory_format=torch.preserve_format)
        if self.kind == "fragments":
            self._relink()
        self.keys = list(keys)


# ------------------------------------------------------------------------------------- model view


def _model_tensors(model: torch.nn.Module):
    """(unique parameters in order with their canonical name, aliases {name: canonical}, persistent
    buffers {name: tensor}, expert layers {layer prefix: experts module})."""
    from moe.parallel.expert import EXPERT_PARAM_NAMES, moe_layers

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


def _expert_meta(expert_layers) -> Dict[str, Any]:
    from moe.parallel.expert import EXPERT_PARAM_NAMES, expert_layout

    out = {}
    for prefix, ex in expert_layers.items():
        _, _, E = expert_layout(ex)
        out[prefix] = {"num_experts": E,
                       "tensors": {t: list(getattr(ex, t).shape[1:]) for t in EXPERT_PARAM_NAMES}}
    return out


# ------------------------------------------------------------------------------------------- save


def save(engine, ckpt_dir: str, step: int, train_state: Dict[str, Any], config_yaml: str, keep_last: int,
         rank: int) -> str:
    """Write step `step` (a collective: call on every rank). Returns the tag. Nothing non-finite is
    ever written: every rank checks the tensors it gathered and all agree before any file is made."""
    import torch.distributed as dist

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
    from moe.parallel.expert import EXPERT_PARAM_NAMES, expert_layout

    dense, _, buffers, expert_layers = _model_tensors(model)
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
    import torch.distributed as dist

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
    import torch.distributed as dist

    from moe.parallel.expert import model_groups

    model = engine.module
    groups = model_groups(model)
    ep_rank, ep_size = (groups.ep_rank, groups.ep_size) if groups else (0, 1)
    if groups is None or groups.edp_rank == 0:
        _save_tensors(shard, os.path.join(tmp_path, shard_name(ep_rank, ep_size)),
                      {"format": FORMAT, "ep_rank": str(ep_rank), "ep_size": str(ep_size)})
    if rank != 0:
        return
    _, aliases, buffers, expert_layers = _model_tensors(model)
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
        "experts": _expert_meta(expert_layers),
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
    from safetensors.torch import save_file

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


# ------------------------------------------------------------------------------------------- read


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
    from safetensors.torch import save_file

    path = resolve_step_dir(path)
    state = consolidated_state_dict(path)
    meta = read_meta(path)
    unique: Dict[str, torch.Tensor] = {k: v for k, v in state.items() if k not in meta["aliases"]}
    config = open(os.path.join(path, "config.yaml")).read() if os.path.isfile(os.path.join(path, "config.yaml")) else ""
    save_file({k: v.contiguous() for k, v in unique.items()}, out,
              metadata={"format": "moe-export", "step": str(meta["step"]), "config": config,
                        "aliases": json.dumps(meta["aliases"])})
    return {"tensors": len(unique), "params": int(sum(v.numel() for v in unique.values())), "step": meta["step"]}


# ------------------------------------------------------------------------------------------- load


def check_compatible(engine, path: str, meta: Dict[str, Any]) -> None:
    """CheckpointError naming every tensor the model and the checkpoint disagree on."""
    dense, aliases, buffers, expert_layers = _model_tensors(engine.module)
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
    ours = _expert_meta(expert_layers)
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
    from moe.parallel.expert import EXPERT_PARAM_NAMES, expert_layout

    path = os.path.join(ckpt_dir, tag)
    if not os.path.isfile(os.path.join(path, "meta.json")) and os.path.isfile(os.path.join(path, LEGACY_MODEL_FILE)):
        return _load_legacy(engine, ckpt_dir, tag)
    _verify_once(path)
    meta = read_meta(path)
    check_compatible(engine, path, meta)

    model = engine.module
    dense, _, buffers, expert_layers = _model_tensors(model)
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


def _verify_once(path: str) -> None:
    """Rank 0 verifies the folder (checksums, structure, finiteness, step) before any state changes;
    every rank learns the verdict, so all refuse together. The cost is one read of the folder."""
    import torch.distributed as dist

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
    from moe.parallel.expert import model_groups

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
