"""`model.init_from`: training starts (step 0, fresh optimizer) from the weights of a run of ours or a
local transformers folder, optionally upcycling a dense model into the MoE config (`model.upcycle`).

Two calls from build_training: `open_init_source` before the model is built (it reads only configs
and the safetensors headers, and refuses a source whose model differs from this config naming the
key, an unknown architecture, or missing tensors naming them: before anything is written), then
`load_init_source` after the engine is built, on every rank in the same order: each parameter and its
fp32 master are set through the optimizer (as a checkpoint load does, so ZeRO's partitions follow),
and each rank reads the experts it holds only (`expert_layout`), from the consolidated source: one
tensor per expert in our checkpoints and in transformers' files, a slice of a fused [E, ...] tensor.

A run that resumes from its own checkpoint ignores model.init_from (the checkpoint holds the trained
weights). A transformers folder is read with json and safetensors only (transformers is optional at
train time); its names and the inverse RoPE permutation are in moe/nn/hf.py, upcycling in
moe/nn/upcycle.py.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from moe.config import Config, ConfigError, ModelConfig, attention_heads, config_from_yaml_text, dense_ffn_hidden, \
    expert_hidden, moe_layer_ids
from moe.errors import CheckpointError, CheckpointNotFound
from moe.io import RunFolder
from moe.nn.hf import Recipe, build_tensor, gated_shared_experts, hf_recipes, model_config_from_hf, recipe_names
from moe.nn.upcycle import expert_weights, granularity, tied_router
from moe.parallel import EXPERT_PARAM_NAMES, expert_layout
from moe.train.checkpoint.folders import list_steps
from moe.train.checkpoint.integrity import expert_index, headers, read_meta, resolve_step_dir
from moe.train.checkpoint.loading import verify_once
from moe.train.checkpoint.optimizer_state import OptimizerState
from moe.train.checkpoint.saving import model_tensors


@dataclass
class InitSource:
    """A checked source of initial weights: where, what model, and how each of our tensors is read."""

    path: str
    architecture: str
    """A transformers architecture (`MixtralForCausalLM`), or `moe` for a step folder of ours."""
    model: ModelConfig
    """The source's model."""
    recipes: Dict[str, Recipe]
    files: Dict[str, str]
    """{tensor name: safetensors file holding it}."""
    granularity: int = 0
    """Upcycling: the chunks each dense FFN is split into (1 = copy); 0 = not upcycling."""
    _open: Dict[str, Any] = field(default_factory=dict)

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(file, framework="pt")
        return self._open[file].get_tensor(name).float()

    def tensor(self, ours: str, experts: Optional[range] = None) -> torch.Tensor:
        return build_tensor(self.recipes[ours], self.read, attention_heads(self.model)[2], experts)


def model_signature(m: ModelConfig) -> Dict[str, Any]:
    """The config values that decide the function a model's weights compute, under their keys."""
    n_heads, n_kv, head_dim = attention_heads(m)
    moe = moe_layer_ids(m)
    out = {"model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.n_layers": m.n_layers,
           "model.n_heads": n_heads, "model.n_kv_heads": n_kv, "model.head_dim": head_dim, "model.qk_norm": m.qk_norm,
           "model.rope_theta": float(m.rope_theta), "model.norm_eps": float(m.norm_eps),
           "model.tie_embeddings": m.tie_embeddings, "model.moe.num_experts": m.moe.num_experts,
           "model.ffn_hidden": dense_ffn_hidden(m) if len(moe) < m.n_layers else None}
    if m.moe.num_experts:
        e = m.moe
        out.update({"model.moe.top_k": e.top_k, "model.moe.expert_hidden": expert_hidden(m),
                    "model.moe.moe_layers": moe, "model.moe.router": e.router, "model.moe.score_func": e.score_func,
                    "model.moe.renormalize": e.renormalize, "model.moe.num_shared_experts": e.num_shared_experts,
                    "model.moe.routed_scaling_factor": float(e.routed_scaling_factor)})
    return out


def _hf_source(path: str) -> InitSource:
    file = os.path.join(path, "config.json")
    try:
        hf = json.load(open(file))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.init_from: {file} is not a readable JSON config ({exc})") from None
    architecture, model = model_config_from_hf(hf, file)
    shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not shards:
        raise ConfigError(f"model.init_from: no *.safetensors in {path} (pickled pytorch_model.bin files are not "
                          f"read: checkpoints are data, never code)")
    files = {name: shard for shard in shards for name in headers(shard)}
    return InitSource(path, architecture, model, hf_recipes(model, architecture, files), files)


def _run_source(path: str) -> InitSource:
    try:
        step_dir = resolve_step_dir(path)
    except CheckpointNotFound:
        raise ConfigError(f"model.init_from={path}: neither a transformers folder (config.json) nor a run, "
                          f"checkpoints or step folder of ours") from None
    if not os.path.isfile(os.path.join(step_dir, "meta.json")):
        raise ConfigError(f"model.init_from={step_dir}: a checkpoint in DeepSpeed's old format; resume it once to "
                          f"write a layout-free one")
    verify_once(step_dir)  # rank 0 reads and checks the folder; every rank refuses together
    model = config_from_yaml_text(open(os.path.join(step_dir, "config.yaml")).read()).model
    meta = read_meta(step_dir)
    files = {name: os.path.join(step_dir, "model.safetensors") for name in headers(os.path.join(step_dir,
                                                                                              "model.safetensors"))}
    files.update({k: os.path.join(step_dir, f[0]) for k, f in expert_index(step_dir).items()})
    recipes: Dict[str, Recipe] = {name: ([(name, "")], False) for name in files}
    for layer, info in meta["experts"].items():
        for t in info["tensors"]:
            recipes[f"{layer}.{t}"] = ([(f"{layer}.{{e}}.{t}", "")], True)
    for alias, target in meta["aliases"].items():
        recipes[alias] = recipes[target]
    return InitSource(step_dir, "moe", model, recipes, files)


def _check_fits(source: InitSource, m: ModelConfig) -> None:
    """ConfigError naming the first key in which the source's model and this config differ (or why
    upcycling cannot keep the function); sets source.granularity when upcycling."""
    have, want = model_signature(source.model), model_signature(m)
    upcycling = source.model.moe.num_experts == 0 and m.moe.num_experts > 0
    if upcycling and not m.upcycle:
        raise ConfigError(f"model.init_from={source.path} is a dense model and this config is an MoE: set "
                          f"model.upcycle=copy or granular to make the experts from its FFNs")
    if m.upcycle and not upcycling:
        raise ConfigError(f"model.upcycle={m.upcycle}: model.init_from={source.path} is not a dense model "
                          f"(it has {source.model.moe.num_experts} experts per MoE layer)")
    for key in want:
        if upcycling and (key.startswith("model.moe.") or key == "model.ffn_hidden" and want[key] is None):
            continue
        if have.get(key) != want[key]:
            raise ConfigError(f"model.init_from={source.path} ({source.architecture}) does not fit this config: "
                              f"{key} is {have.get(key)} there and {want[key]} here")
    if upcycling:
        source.granularity = granularity(m, dense_ffn_hidden(source.model))


def open_init_source(cfg: Config) -> Optional[InitSource]:
    """The checked source of model.init_from, or None (not set, or the run resumes from its own
    checkpoint). Reads configs and safetensors headers only."""
    path = cfg.model.init_from
    if not path or (cfg.checkpoint.resume and list_steps(RunFolder.of(cfg.run.root, cfg.run.name).checkpoints)):
        return None
    if not os.path.isdir(path):
        raise ConfigError(f"model.init_from={path}: no such folder")
    hf_folder = os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "meta.json"))
    source = _hf_source(path) if hf_folder else _run_source(path)
    _check_fits(source, cfg.model)
    missing = [n for recipe in source.recipes.values() for n in recipe_names(recipe, source.model.moe.num_experts)
               if n not in source.files]
    gates = gated_shared_experts(source.model, source.architecture)
    missing += [n for n in gates if n not in source.files]
    if missing:
        raise ConfigError(f"model.init_from={path}: {len(missing)} tensors of {source.architecture} missing: "
                          + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
    for name in gates:
        if bool(source.read(name).any()):
            raise ConfigError(f"model.init_from={path}: {name} is not zero; Qwen2-MoE scales its shared expert by "
                              f"sigmoid(gate . x), which our (ungated) shared experts compute only with the gate zero")
    return source


def _fill(model: torch.nn.Module, source: InitSource, cfg: Config, write) -> None:
    """Every parameter (and persistent buffer) of `model` from the source, through `write(name,
    param, value)`, in model order; each rank reads only the experts it holds."""
    g = source.granularity
    dense, _, buffers, expert_layers = model_tensors(model)
    for name, p in dense:
        if g and name.endswith("ffn.router.weight"):
            write(name, p, tied_router(p.detach().float().cpu(), g))
        else:
            write(name, p, source.tensor(name))
    with torch.no_grad():
        for name, buf in buffers.items():
            if name in source.recipes and not g:
                buf.copy_(source.tensor(name).to(buf.device, buf.dtype))
    for prefix, ex in expert_layers.items():
        offset, local, _ = expert_layout(ex)
        mine = range(offset, offset + local)
        if g:
            block = prefix.split(".")[1]
            w13, w2 = expert_weights(cfg.model, source.tensor(f"blocks.{block}.ffn.w13.weight"),
                                     source.tensor(f"blocks.{block}.ffn.w2.weight"), mine, int(block), cfg.run.seed)
            values = {"w13": w13, "w2": w2}
        else:
            values = {t: source.tensor(f"{prefix}.{t}", mine) for t in EXPERT_PARAM_NAMES}
        for t in EXPERT_PARAM_NAMES:
            write(f"{prefix}.{t}", getattr(ex, t), values[t])


def _checked(name: str, p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    if tuple(value.shape) != tuple(p.shape):
        raise CheckpointError(f"model.init_from: {name} has shape {list(value.shape)} there, {list(p.shape)} here")
    return value


def init_module(model: torch.nn.Module, source: InitSource, cfg: Config) -> None:
    """Set a plain (engine-less) model's weights from the source."""
    def write(name, p, value):
        with torch.no_grad():
            p.copy_(_checked(name, p, value).to(p.device, p.dtype))

    _fill(model, source, cfg, write)


def load_init_source(engine, source: InitSource, cfg: Config, rank: int) -> None:
    """Write the source's weights into the engine's model and its fp32 masters (a collective order:
    every rank, every parameter, the same order), as a checkpoint load does; fresh optimizer."""
    opt = OptimizerState(engine)
    _fill(engine.module, source, cfg, lambda name, p, value: opt.set(p, _checked(name, p, value), {}))
    if rank == 0:
        g = source.granularity
        how = f", upcycled ({cfg.model.upcycle}, {g} chunk{'s' if g > 1 else ''} per FFN)" if g else ""
        print(f"[moe] init_from {source.path} ({source.architecture}{how})", flush=True)
