"""The config tree's own checks: every numeric knob in its range (`RANGES`: finite, sizes capped),
the model's shape, the MoE knobs that are plain config, the parallel layout, training, logging and the
run name. Each raises a one-line ConfigError naming the key.

Knobs whose meaning belongs to a component above the config (the router family, the expert backend,
the corpus) are checked by that component; moe/validate.py runs these checks and the components' in
one order. The stages below are public so that it can interleave them: `check_ranges_and_shape`,
`check_moe_fields`, `check_run_fields` (`check_fields` runs all three).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

from moe.config.schema import (Config, ModelConfig, MoEConfig, RunConfig, TrainConfig, attention_heads,
                               dense_ffn_hidden, expert_hidden, global_batch_size, moe_layer_ids)
from moe.errors import ConfigError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class Range:
    """The values one numeric knob accepts: from `lo` to `hi` (inf: any finite value), each end
    included unless `*_open`; `why` explains a bound in the error."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""

    def __contains__(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def describe(self) -> str:
        lo = f"{'>' if self.lo_open else '>='} {_fmt(self.lo)}"
        hi = "finite" if self.hi == math.inf else f"{'<' if self.hi_open else '<='} {_fmt(self.hi)}"
        return f"{lo} and {hi}" + (f" ({self.why})" if self.why else "")


def _fmt(x: float) -> str:
    if isinstance(x, int) and x >= 1024 and x & (x - 1) == 0:
        return f"2**{x.bit_length() - 1}"
    return str(x) if isinstance(x, int) else f"{x:g}"


# The range of every int and float field, checked before anything else in validate(), so that no
# NaN, infinity or absurd size reaches a cross-field check, the model or a file. Size caps are far
# beyond what this code trains, but finite: `max_seq_len=1e12` is a typo, not a request for a RoPE
# table of 1e12 rows. (tests/unit/config/test_checks.py checks that every numeric field is listed.)
RANGES: Dict[str, Range] = {
    # model
    "model.vocab_size": Range(0, 2**24, why="0 = from the tokenizer"),
    "model.d_model": Range(1, 2**16),
    "model.n_layers": Range(1, 2**10),
    "model.n_heads": Range(1, 2**16),
    "model.n_kv_heads": Range(0, 2**16, why="0 = model.n_heads"),
    "model.head_dim": Range(0, 2**16, why="0 = model.d_model / model.n_heads"),
    "model.ffn_hidden": Range(0, 2**18, why="0 = 8/3 x model.d_model"),
    "model.max_seq_len": Range(1, 2**20, why="the RoPE tables have this many rows"),
    "model.rope_theta": Range(1, 1e12, lo_open=True, why="the RoPE frequencies theta**(-2i/d) fall only for theta > 1"),
    "model.norm_eps": Range(1e-30, 1, why="0, or below fp32's range, divides a zero vector by zero"),
    "model.init_std": Range(0, 1, lo_open=True),
    "model.upcycle_noise": Range(0, 10, why="relative to the std of the copied dense weights"),
    # model.moe (moe_layers, a list, is checked in check_moe_layers)
    "model.moe.num_experts": Range(0, 2**16, why="0 = dense"),
    "model.moe.top_k": Range(1, 2**16),
    "model.moe.expert_hidden": Range(0, 2**18, why="0 = model.ffn_hidden"),
    "model.moe.num_shared_experts": Range(0, 2**10),
    "model.moe.moe_every": Range(1, 2**10),
    "model.moe.sinkhorn_iters": Range(1, 10_000),
    "model.moe.hash_seed": Range(0, 2**32 - 1, why="the hash uses 32 bits of it"),
    "model.moe.jitter_eps": Range(0, 1, hi_open=True, why="the input is scaled by U(1 - eps, 1 + eps)"),
    "model.moe.n_groups": Range(0, 2**16),
    "model.moe.topk_groups": Range(0, 2**16),
    "model.moe.aux_loss_coef": Range(0, 1000),
    "model.moe.seq_aux_loss_coef": Range(0, 1000),
    "model.moe.global_aux_loss_coef": Range(0, 1000),
    "model.moe.z_loss_coef": Range(0, 1000),
    "model.moe.bias_update_rate": Range(0, 1, why="the bias is added to scores in [0, 1]"),
    "model.moe.capacity_factor": Range(0, 2**16, why="0 = dropless"),
    "model.moe.eval_capacity_factor": Range(0, 2**16, why="0 = dropless"),
    "model.moe.min_capacity": Range(0, 2**31 - 1),
    "model.moe.routed_scaling_factor": Range(0, 1000, lo_open=True),
    # data
    "data.bpe_vocab_size": Range(0, 2**24),
    "data.max_bytes": Range(0, 2**50, why="0 = all"),
    "data.val_fraction": Range(0, 1, lo_open=True, hi_open=True),
    # train
    "train.steps": Range(1, 2**40),
    "train.seq_len": Range(1, 2**20),
    "train.micro_batch_size": Range(1, 2**20),
    "train.global_batch_size": Range(0, 2**30, why="0 = micro_batch_size x world size"),
    "train.lr": Range(0, 10, lo_open=True),
    "train.min_lr_ratio": Range(0, 1),
    "train.warmup_steps": Range(0, 2**40),
    "train.weight_decay": Range(0, 10),
    "train.beta1": Range(0, 1, hi_open=True),
    "train.beta2": Range(0, 1, hi_open=True),
    "train.eps": Range(1e-30, 1, why="0, or below fp32's range, makes Adam divide 0 by 0"),
    "train.grad_clip": Range(0, why="0 = no clipping"),
    "train.zero_stage": Range(0, 2, why="DeepSpeed's MoE refuses ZeRO-3"),
    "train.eval_every": Range(0, 2**40, why="0 = only at the end"),
    "train.eval_batches": Range(1, 2**30),
    "train.eval_tasks_limit": Range(0, 2**40, why="0 = every document"),
    "train.log_every": Range(1, 2**40),
    "train.threads": Range(0, 2**12, why="0 = torch's default"),
    # parallel
    "parallel.ep_size": Range(1, 2**16),
    "parallel.timeout_s": Range(1, 30 * 86400, why="at most 30 days"),
    # checkpoint
    "checkpoint.every": Range(0, 2**40, why="0 = only at the end"),
    "checkpoint.keep_last": Range(1, 2**20),
    # run
    "run.seed": Range(0, 2**32 - 1, why="numpy's seed range"),
}

QK_NORMS = ("none", "head", "proj")
"""model.qk_norm: none, per head over head_dim (Qwen3), over the whole q and k projections (OLMoE)."""
MAX_PARAMS = 2**40
"""More parameters than this (4 TiB in fp32) is a typo in a size, refused before anything is allocated."""
MAX_ROPE_ENTRIES = 2**30
"""RoPE table entries (max_seq_len x head size, fp32 cos and sin: 4 GiB), allocated in every process."""
MAX_NAME_BYTES = 200
"""Longest run or sweep name: a file system allows 255 bytes, and `<name>.old-<time>` must fit too."""


# -------------------------------------------------------------------------------------------- stages


def check_fields(cfg: Config, world_size: int = 1) -> None:
    """Every check of the config's own fields, in validate()'s order, without the components' checks."""
    check_ranges_and_shape(cfg)
    check_moe_fields(cfg.model)
    check_run_fields(cfg, world_size)


def check_ranges_and_shape(cfg: Config) -> None:
    """First of all: the ranges, so that no NaN, infinity or absurd size reaches a later check; then
    the model's shape (heads, RoPE table and parameter count)."""
    check_ranges(cfg)
    check_model_shape(cfg.model)


def check_run_fields(cfg: Config, world_size: int) -> None:
    """The parallel layout, training, logging and the run name."""
    check_parallel(cfg, world_size)
    check_train(cfg, world_size)
    check_logging(cfg)
    check_run_name(cfg.run)


# ------------------------------------------------------------------------------------- ranges, model


def check_ranges(cfg: Config) -> None:
    """Every RANGES key holds a finite number inside its range (a bool or a string is not a number)."""
    for key, rng in RANGES.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        _check(value in rng, f"{key} must be {rng.describe()}, got {value}")


def check_model_shape(m: ModelConfig) -> None:
    """Attention heads of even (RoPE) width, key/value heads that divide the query heads, a known
    QK-norm, a RoPE table and a parameter count of sane size."""
    check_attention(m)
    check_upcycle(m)
    _, _, head = attention_heads(m)
    rope = m.max_seq_len * head
    _check(rope <= MAX_ROPE_ENTRIES,
           f"model.max_seq_len ({m.max_seq_len}) x head size ({head}) = {rope} RoPE table entries, more than "
           f"{_fmt(MAX_ROPE_ENTRIES)} ({MAX_ROPE_ENTRIES * 4 // 2**30} GiB); lower model.max_seq_len")
    params = _params_upper_bound(m)
    _check(params <= MAX_PARAMS,
           f"model: up to {params:.3g} parameters, more than {_fmt(MAX_PARAMS)}: lower model.d_model, model.n_layers, "
           f"model.vocab_size, model.ffn_hidden or model.moe.num_experts / expert_hidden")


def check_attention(m: ModelConfig) -> None:
    if m.head_dim == 0:
        _check(m.d_model % m.n_heads == 0,
               f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads}), or set model.head_dim")
        _check((m.d_model // m.n_heads) % 2 == 0,
               f"model.d_model / model.n_heads must be even for RoPE, got {m.d_model // m.n_heads}")
    else:
        _check(m.head_dim % 2 == 0, f"model.head_dim must be even for RoPE, got {m.head_dim}")
    n_kv = m.n_kv_heads or m.n_heads
    _check(n_kv <= m.n_heads and m.n_heads % n_kv == 0,
           f"model.n_kv_heads ({n_kv}) must divide model.n_heads ({m.n_heads}): each key/value head serves "
           f"an equal group of query heads")
    _check(m.qk_norm in QK_NORMS, f"model.qk_norm must be one of {', '.join(QK_NORMS)}, got {m.qk_norm!r}")


def check_upcycle(m: ModelConfig) -> None:
    """model.upcycle names a mode and comes with a source and experts (the rest: moe/nn/upcycle.py)."""
    _check(m.upcycle in ("", "copy", "granular"), f"model.upcycle must be copy, granular or empty, got {m.upcycle!r}")
    _check(not m.upcycle or (m.init_from and m.moe.num_experts > 0),
           f"model.upcycle={m.upcycle} makes experts from a dense model: it needs model.init_from (the dense run or "
           f"transformers folder) and an MoE config (model.moe.num_experts > 0)")


def _params_upper_bound(m: ModelConfig) -> int:
    """At least the model's parameter count, from the config alone (moe/tools/match.py counts it exactly,
    but needs the vocabulary; an unresolved one, 0, counts nothing here)."""
    d, e = m.d_model, m.moe
    n_heads, n_kv, head = m.n_heads, m.n_kv_heads or m.n_heads, m.head_dim or max(1, m.d_model // m.n_heads)
    attention = d * (n_heads + 2 * n_kv) * head + n_heads * head * d + 2 * (n_heads + n_kv) * head
    dense = 3 * d * dense_ffn_hidden(m)
    moe = (e.num_experts + e.num_shared_experts) * 3 * d * expert_hidden(m) + e.num_experts * d
    per_layer = attention + 2 * d + max(dense, moe if e.num_experts else 0)
    return m.n_layers * per_layer + m.vocab_size * d * (1 if m.tie_embeddings else 2) + d


# ----------------------------------------------------------------------------------------------- MoE


def check_moe_fields(m: ModelConfig) -> None:
    """The MoE knobs that are plain config. They matter only with experts (a dense model ignores
    them); the router family (moe.routing.check_config) and the expert backend
    (moe.nn.experts.check_config) check their own."""
    moe = m.moe
    if moe.num_experts == 0:
        return
    _check(moe.top_k <= moe.num_experts,
           f"model.moe.top_k ({moe.top_k}) must be in [1, model.moe.num_experts={moe.num_experts}]")
    check_moe_layers(m)
    _check(moe.score_func in ("softmax", "sigmoid"),
           f"model.moe.score_func must be softmax or sigmoid, got {moe.score_func!r}")
    _check(not moe.random_routing or moe.top_k == 2,
           f"model.moe.random_routing (GShard) drops the 2nd of two experts: it needs model.moe.top_k=2, "
           f"got {moe.top_k}")
    check_moe_groups(moe)
    check_drop_policy(moe)
    _check(moe.dispatch in ("auto", "extension", "reference"),
           f"model.moe.dispatch must be auto, extension or reference, got {moe.dispatch!r}")


def check_moe_layers(m: ModelConfig) -> None:
    """moe_layers inside the model, and at least one MoE block."""
    moe = m.moe
    if moe.moe_layers is not None:
        bad = [i for i in moe.moe_layers if not 0 <= i < m.n_layers]
        _check(not bad, f"model.moe.moe_layers: {bad} out of range [0, {m.n_layers})")
    _check(len(moe_layer_ids(m)) > 0, f"model.moe.moe_every={moe.moe_every} selects no layer of {m.n_layers}")


def check_moe_groups(moe: MoEConfig) -> None:
    """Group-limited routing (DeepSeek-V3): both knobs or neither, and groups that can hold top_k experts."""
    _check((moe.n_groups > 0) == (moe.topk_groups > 0),
           f"group-limited routing needs both model.moe.n_groups and model.moe.topk_groups > 0 "
           f"(got n_groups={moe.n_groups}, topk_groups={moe.topk_groups})")
    if moe.n_groups == 0:
        return
    _check(moe.num_experts % moe.n_groups == 0,
           f"model.moe.n_groups ({moe.n_groups}) must divide model.moe.num_experts ({moe.num_experts})")
    _check(moe.topk_groups <= moe.n_groups,
           f"model.moe.topk_groups ({moe.topk_groups}) must be <= model.moe.n_groups ({moe.n_groups})")
    _check(moe.topk_groups <= moe.top_k,
           f"model.moe.topk_groups ({moe.topk_groups}) must be <= model.moe.top_k ({moe.top_k}): a group's "
           f"score is the sum of its top top_k // topk_groups expert scores")
    _check(moe.top_k <= moe.topk_groups * (moe.num_experts // moe.n_groups),
           f"model.moe.top_k ({moe.top_k}) exceeds the experts in model.moe.topk_groups={moe.topk_groups} "
           f"groups of {moe.num_experts // moe.n_groups}")


def check_drop_policy(moe: MoEConfig) -> None:
    """A known policy, and one that has a capacity to act on."""
    _check(moe.drop_policy in ("probs", "position"),
           f"model.moe.drop_policy must be probs or position, got {moe.drop_policy!r}")
    _check(moe.drop_policy != "position" or moe.capacity_factor > 0 or moe.eval_capacity_factor > 0,
           "model.moe.drop_policy=position has no effect without a capacity: set model.moe.capacity_factor "
           "(or model.moe.eval_capacity_factor) > 0")


# ------------------------------------------------------------------------------ parallel, train, run


def check_parallel(cfg: Config, world_size: int) -> None:
    """Expert parallelism only with experts and dividing the world; a known backend."""
    p = cfg.parallel
    _check(p.ep_size == 1 or cfg.model.moe.num_experts > 0,
           f"parallel.ep_size={p.ep_size} needs MoE layers (model.moe.num_experts > 0); a dense model uses 1")
    _check(world_size % p.ep_size == 0, f"parallel.ep_size ({p.ep_size}) must divide the world size ({world_size})")
    _check(p.backend in ("auto", "gloo", "nccl"), f"parallel.backend must be auto, gloo or nccl, got {p.backend!r}")


def check_train(cfg: Config, world_size: int) -> None:
    """Sequences that fit the model, a global batch of whole micro-batches per rank, a known dtype."""
    t = cfg.train
    _check(t.seq_len <= cfg.model.max_seq_len,
           f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    gbs = global_batch_size(cfg, world_size)
    _check(gbs % (t.micro_batch_size * world_size) == 0,
           f"train.global_batch_size ({gbs}) must be a multiple of train.micro_batch_size "
           f"({t.micro_batch_size}) x data-parallel size ({world_size})")
    _check(t.dtype in ("auto", "fp32", "bf16"), f"train.dtype must be auto, fp32 or bf16, got {t.dtype!r}")
    _check(t.recompute in ("none", "moe", "full"),
           f"train.recompute must be none, moe or full, got {t.recompute!r}")
    check_eval_tasks(t)


def check_eval_tasks(t: TrainConfig) -> None:
    """train.eval_tasks: names that are not empty, an include path that is a folder (the names are
    looked up in lm-eval's index when the run starts, moe/train/downstream.py)."""
    for name in t.eval_tasks:
        _check(isinstance(name, str) and name.strip() == name and name and "," not in name,
               f"train.eval_tasks: {name!r} is not a task name (one name per list item, no commas or spaces)")
    _check(len(set(t.eval_tasks)) == len(t.eval_tasks), f"train.eval_tasks: a task named twice in {t.eval_tasks}")
    _check(not t.eval_include_path or os.path.isdir(t.eval_include_path),
           f"train.eval_include_path={t.eval_include_path}: not a folder (of lm-eval task YAML files)")


def check_logging(cfg: Config) -> None:
    """A known W&B mode (checkpoint.every and keep_last are plain ranges: RANGES)."""
    _check(cfg.logging.wandb.mode in ("offline", "online", "disabled"),
           f"logging.wandb.mode must be offline, online or disabled, got {cfg.logging.wandb.mode!r}")


def check_run_name(run: RunConfig) -> None:
    """run.name is one plain folder inside run.root (which may be any path)."""
    error = folder_name_error("run.name", run.name)
    _check(error is None, str(error))


def folder_name_problem(name: str) -> Optional[str]:
    """Why `name` cannot be one plain folder inside its parent (None when it can): it must not leave
    the parent (`..`, `/`, `\\`) or be the parent (`.`), must not read as an option (leading `-`),
    and must fit a file system's name limit with room for a suffix."""
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "is . or .., not a folder of its own"
    if any(c in name for c in "/\\"):
        return "contains a path separator (/ or \\)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character (NUL, newline, ...)"
    if name.startswith("-"):
        return "starts with - (it would read as a command-line option)"
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long, more than {MAX_NAME_BYTES}"
    return None


def folder_name_error(what: str, name: str) -> Optional[str]:
    """The one-line error when `name` (`what`: its key or role) is not a plain folder name, else None."""
    why = folder_name_problem(name)
    if why is None:
        return None
    shown = repr(name if len(name) <= 60 else name[:57] + "...")
    return f"{what} must be a plain folder name: {shown} {why}"
