"""One typed config tree for every run.

Each component owns a small dataclass whose fields are documented where they are declared. A run's
config is merged as: dataclass defaults < YAML file(s) < dotted command-line overrides
(`model.n_layers=4`). Unknown keys and wrong types are rejected by OmegaConf's structured merge;
cross-field checks live in `validate()`, which runs before any model or data is built. Every error
is a `ConfigError` whose message names the offending key.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


# --------------------------------------------------------------------------------------------- model


@dataclass
class MoEConfig:
    """Mixture-of-experts FFN settings. `num_experts: 0` means every FFN is dense.

    Grouped as: layer shape; router family and scoring; routing noise; group-limited routing;
    balancing (losses and the auxiliary-loss-free bias); capacity and dropping; backends. Which
    combinations make sense is checked in `validate()` (and each router's `validate_config`).
    """

    # --- layer shape
    num_experts: int = 0
    """Routed experts per MoE layer; 0 makes the whole model dense."""
    top_k: int = 2
    """Experts each token is sent to (token-choice routers: topk, sinkhorn, hash; switch needs 1).
    For router=expert_choice it is the compute-matched average number of experts per token: each
    expert takes capacity_factor * tokens * top_k / num_experts tokens."""
    expert_hidden: int = 0
    """Hidden size of one routed expert's SwiGLU FFN; 0 means model.ffn_hidden. Smaller values give
    fine-grained experts (DeepSeekMoE)."""
    num_shared_experts: int = 0
    """Experts that see every token, added to the routed output (DeepSeekMoE); any count. Each has
    expert_hidden (they run as one dense FFN of num_shared_experts * expert_hidden)."""
    moe_every: int = 1
    """Every n-th block (1-based: blocks n-1, 2n-1, ...) gets an MoE FFN; the others are dense."""
    moe_layers: Optional[List[int]] = None
    """Explicit 0-based list of MoE blocks; overrides moe_every when set."""

    # --- router family and scoring
    router: str = "topk"
    """Router family, by registry name (moe/routing/__init__.py): `topk` (token choice, GShard/Mixtral/
    DeepSeek-V3), `switch` (top-1), `expert_choice` (each expert picks its top tokens, Zhou et al.
    2022), `sinkhorn` (Sinkhorn-balanced selection, BASE layers), `hash` (fixed token-id hash,
    Roller et al. 2021)."""
    score_func: str = "softmax"
    """How router logits become scores: `softmax` (over all experts, before top-k: GShard/Switch) or
    `sigmoid` (independent per-expert scores, DeepSeek-V3; the k gates are renormalised to sum to 1
    when top_k > 1)."""
    renormalize: bool = False
    """Rescale the top-k softmax gate weights of each token to sum to 1. Identical to softmax after
    top-k (Mixtral)."""
    sinkhorn_iters: int = 10
    """router=sinkhorn: Sinkhorn-Knopp iterations (log domain) that balance the [tokens, experts]
    assignment before the top-k selection in training."""
    hash_seed: int = 0
    """router=hash: seed of the fixed token-id -> experts hash (each token id gets a fixed random set
    of top_k distinct experts)."""

    # --- routing noise (training only)
    noisy_gating: bool = False
    """Noisy top-k gating (Shazeer et al. 2017): add N(0, 1) * softplus(x W_noise) to the router logits
    in training, with a learned W_noise (initialised to zero)."""
    jitter_eps: float = 0.0
    """Multiplicative input jitter (Switch): scale the router's input by U(1 - eps, 1 + eps) in
    training (the experts see the clean input). 0 disables; Switch used 0.01."""
    random_routing: bool = False
    """GShard random routing (top_k=2, router=topk): in training a token's 2nd expert is used only with
    probability min(1, 2 * g2 / (g1 + g2)); unused slots cost no expert compute or capacity."""

    # --- group-limited routing (DeepSeek-V3)
    n_groups: int = 0
    """Split the experts into this many equal groups and route each token inside its topk_groups
    best groups (group score = sum of its top top_k // topk_groups expert scores). 0 = off."""
    topk_groups: int = 0
    """Groups each token may use when n_groups > 0 (1 <= topk_groups <= n_groups)."""

    # --- balancing. The losses are scaled by their coefficient and added to the training loss.
    aux_loss_coef: float = 0.01
    """Switch/GShard load-balancing loss E * sum_e f_e * P_e over each micro-batch; 0 disables it.
    Depends on the micro-batch size (not layout invariant)."""
    seq_aux_loss_coef: float = 0.0
    """Sequence-level balancing loss (DeepSeek-V3): the Switch loss of each sequence, averaged over
    sequences; 0 disables it. Layout invariant."""
    global_aux_loss_coef: float = 0.0
    """Global-batch balancing loss (Qwen, Qiu et al. 2025): E * sum_e f_e * P_e where f_e is the expert
    load of the whole previous optimizer step (counted over every micro-batch and summed over
    data-parallel ranks) and P_e the micro-batch's mean probability; 0 disables it. Exactly layout
    invariant; the first step has f uniform (no gradient)."""
    z_loss_coef: float = 0.001
    """Coefficient of the ST-MoE router z-loss (mean squared logsumexp of the logits); 0 disables it."""
    bias_update_rate: float = 0.0
    """Auxiliary-loss-free balancing (Wang et al. 2024, DeepSeek-V3): a per-expert bias added to the
    scores for selection only (never to the gate weights), updated after each optimizer step by
    rate * sign(mean load - load) from the step's load over all ranks and micro-batches; saved in
    checkpoints. 0 disables it; DeepSeek-V3 used 0.001."""

    # --- capacity and dropping
    capacity_factor: float = 0.0
    """Training capacity per expert = capacity_factor * tokens * top_k / num_experts; 0 = dropless.
    router=expert_choice needs it > 0 (capacity is how expert choice selects)."""
    eval_capacity_factor: float = 0.0
    """Capacity factor used in eval/generation; 0 = dropless (router=expert_choice: capacity_factor)."""
    min_capacity: int = 4
    """Lower bound of the per-expert capacity when a capacity factor is set."""
    drop_policy: str = "probs"
    """Which tokens an over-full expert keeps: `probs` (highest gate weight) or `position` (earliest).
    Dropped (token, expert) pairs contribute nothing: a token with no kept expert passes through the
    residual path unchanged."""

    # --- backends
    dispatch: str = "auto"
    """Token permutation backend: `auto` (compiled extension when built, else reference),
    `extension` or `reference` (pure PyTorch). MOE_DISPATCH=reference in the environment forces it."""
    experts_impl: str = "auto"
    """Expert computation backend by registry name (see moe/experts.py): `loop` (one GEMM per expert;
    on CPU with the extension one compiled grouped SwiGLU), `padded` (one batched GEMM over segments
    padded to the largest), `grouped` (torch._grouped_mm, no host sync; needs d_model and
    expert_hidden multiples of 8), or `auto`: `grouped` on CUDA in bf16 (autocast included), else `loop`."""


@dataclass
class ModelConfig:
    vocab_size: int = 0
    """Vocabulary size; 0 takes it from the tokenizer."""
    d_model: int = 128
    """Residual stream width."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads; d_model must divide by it."""
    ffn_hidden: int = 0
    """Hidden size of the dense SwiGLU FFN; 0 means 8/3 * d_model rounded up to a multiple of 16."""
    max_seq_len: int = 1024
    """Longest sequence the model accepts (RoPE table size)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    init_std: float = 0.02
    """Std of the normal init; output projections are scaled by 1/sqrt(2 * n_layers)."""
    moe: MoEConfig = field(default_factory=MoEConfig)


# ---------------------------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    dataset: str = "embedded:stdlib"
    """`embedded:stdlib` (the Python standard library's own source, on every machine), a local
    text/json/jsonl/parquet file or folder, or a Hugging Face hub dataset name (online only)."""
    dataset_config: Optional[str] = None
    """Hub dataset config name (for example `wikitext-2-raw-v1`)."""
    text_field: str = "text"
    """Column holding the text in json/parquet/hub datasets."""
    tokenizer: str = "bytes"
    """`bytes` (256 byte values + EOS), `bpe` (byte-level BPE trained on the train split and cached),
    or a pretrained Hugging Face tokenizer name or local path."""
    bpe_vocab_size: int = 4096
    """Vocabulary size when tokenizer=bpe."""
    max_bytes: int = 0
    """Read at most this many bytes of raw text (0 = all); keeps the embedded corpus small."""
    val_fraction: float = 0.02
    """Fraction of documents held out for validation (deterministic, by document hash)."""
    cache_dir: str = "data_cache"
    """Where tokenized .bin/.idx files and trained tokenizers are cached."""


# --------------------------------------------------------------------------------------------- train


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps."""
    seq_len: int = 256
    """Tokens per sequence."""
    micro_batch_size: int = 8
    """Sequences per rank per forward/backward."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all data-parallel ranks; 0 = micro_batch_size * world size.
    Must be a multiple of micro_batch_size * data-parallel size; the quotient is the number of
    gradient-accumulation steps."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms, biases and embeddings)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    dtype: str = "auto"
    """`auto` (bf16 on GPU, fp32 on CPU), `fp32` or `bf16`."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0, 1 or 2; DeepSpeed's MoE refuses 3)."""
    eval_every: int = 50
    """Evaluate every n steps (and at the end); 0 = only at the end."""
    eval_batches: int = 8
    """Micro-batches per evaluation."""
    log_every: int = 10
    """Write a metrics line every n steps."""
    compile: bool = False
    """torch.compile each transformer block (moe/parallel.py `apply_compile`): the first training step
    and the first evaluation compile (seconds to a minute), later steps run the compiled code. Losses
    and router statistics equal eager's to rounding, except that routers drawing random numbers
    (noisy_gating, jitter_eps, random_routing) draw other numbers than eager does."""
    threads: int = 0
    """torch intra-op threads on CPU; 0 = torch's default."""
    keep_freed_memory: bool = True
    """Keep freed host memory in the process for reuse (glibc malloc: no mmap-ed blocks, no trimming;
    see moe/host_memory.py) so large CPU tensors are not page-faulted in anew every step; resident
    memory then stays at its peak. No effect off glibc."""


@dataclass
class ParallelConfig:
    ep_size: int = 1
    """Expert-parallel size: each MoE layer's experts are split over groups of this many consecutive
    ranks (E/ep_size experts per rank, tokens exchanged with all_to_all); the world is data parallel
    for everything else. Must divide model.moe.num_experts and the world size. Checkpoints are
    layout-free: a run may resume at another ep_size (moe/expert_parallel.py, moe/checkpoint.py)."""
    backend: str = "auto"
    """torch.distributed backend: `auto` (nccl on GPU, gloo on CPU), `gloo` or `nccl`."""
    timeout_s: int = 600
    """Collective timeout (seconds) of every process group (the default one, DeepSpeed's gradient
    all-reduce group, the expert-parallel groups): a dead or stuck rank ends the job with an error
    naming this rank and the collective after at most this long."""


@dataclass
class WandbConfig:
    mode: str = "offline"
    """`offline` (default, no login needed), `online` or `disabled`; WANDB_MODE overrides it."""
    project: str = "moe"
    entity: Optional[str] = None
    group: Optional[str] = None
    """Defaults to the run name's experiment (the config file's stem)."""
    tags: List[str] = field(default_factory=list)
    job_type: str = "train"


@dataclass
class LoggingConfig:
    progress: bool = True
    """Show a progress bar with loss and tokens/s on rank 0."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every n steps (and at the end); 0 = only at the end."""
    keep_last: int = 2
    """Keep this many step folders; older ones are deleted after a successful save."""
    resume: bool = True
    """Resume from runs/<name>/checkpoints/latest when it exists."""
    save_final: bool = True
    """Save a checkpoint when training ends."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run folder name under run.root."""
    root: str = "runs"
    """Parent folder of run folders."""
    seed: int = 1234
    overwrite: bool = False
    """Allow a run folder that already holds a different config to be reused (its checkpoints are
    then ignored and replaced)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# ------------------------------------------------------------------------------------------- loading


def _error_key(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or ""
    msg = getattr(exc, "msg", None) or str(exc).splitlines()[0]
    return f"{key}: {msg}" if key else msg


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """defaults < YAML at `path` (may list `defaults: [other.yaml]` to layer files) < overrides."""
    schema = OmegaConf.structured(Config)
    layers: List[Any] = []
    if path is not None:
        layers.extend(_yaml_layers(path, seen=()))
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key=value (for example model.n_layers=4)")
        key = ov.split("=", 1)[0]
        if key.startswith("+") or key.startswith("~"):
            raise ConfigError(f"override {ov!r}: adding or removing keys is not allowed")
        try:
            layers.append(OmegaConf.from_dotlist([ov]))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {ov!r}: {_error_key(exc)}") from None
    try:
        merged = OmegaConf.merge(schema, *layers)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(_error_key(exc)) from None
    if path is not None and not _name_overridden(overrides) and not _name_in_yaml(path):
        cfg.run.name = os.path.splitext(os.path.basename(path))[0]
    return cfg


def _name_overridden(overrides: Optional[List[str]]) -> bool:
    return any(o.split("=", 1)[0] == "run.name" for o in overrides or [])


def _name_in_yaml(path: str) -> bool:
    for layer in _yaml_layers(path, seen=()):
        if OmegaConf.select(layer, "run.name") is not None:
            return True
    return False


def _yaml_layers(path: str, seen: tuple) -> List[Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.abspath(path) in seen:
        raise ConfigError(f"{path}: `defaults` includes itself")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml syntax errors
        raise ConfigError(f"{path}: cannot parse YAML: {exc}") from None
    if not OmegaConf.is_dict(raw):
        raise ConfigError(f"{path}: top level must be a mapping")
    layers: List[Any] = []
    if "defaults" in raw:
        parents = raw.pop("defaults")
        if isinstance(parents, str):
            parents = [parents]
        for parent in parents:
            parent_path = os.path.join(os.path.dirname(path), str(parent))
            layers.extend(_yaml_layers(parent_path, seen + (os.path.abspath(path),)))
    layers.append(raw)
    return layers


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_yaml_text(text: str) -> Config:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(_error_key(exc)) from None


# ---------------------------------------------------------------------------------------- validation


def dense_ffn_hidden(m: ModelConfig) -> int:
    if m.ffn_hidden > 0:
        return m.ffn_hidden
    return ((8 * m.d_model // 3) + 15) // 16 * 16


def expert_hidden(m: ModelConfig) -> int:
    return m.moe.expert_hidden if m.moe.expert_hidden > 0 else dense_ffn_hidden(m)


def moe_layer_ids(m: ModelConfig) -> List[int]:
    if m.moe.num_experts == 0:
        return []
    if m.moe.moe_layers is not None:
        return sorted(set(m.moe.moe_layers))
    n = m.moe.moe_every
    return [i for i in range(m.n_layers) if (i + 1) % n == 0]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config, world_size: int = 1) -> None:
    """Cross-field checks; raises ConfigError naming the key. Runs before anything heavy."""
    from moe.routing import ROUTERS  # late import: routing imports config

    m, moe, t, p = cfg.model, cfg.model.moe, cfg.train, cfg.parallel
    _check(m.d_model > 0, f"model.d_model must be > 0, got {m.d_model}")
    _check(m.n_layers > 0, f"model.n_layers must be > 0, got {m.n_layers}")
    _check(m.n_heads > 0 and m.d_model % m.n_heads == 0,
           f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    _check((m.d_model // m.n_heads) % 2 == 0, "model.d_model / model.n_heads must be even for RoPE")
    _check(m.vocab_size >= 0, f"model.vocab_size must be >= 0, got {m.vocab_size}")
    _check(m.ffn_hidden >= 0, f"model.ffn_hidden must be >= 0, got {m.ffn_hidden}")
    _check(t.seq_len > 0, f"train.seq_len must be > 0, got {t.seq_len}")
    _check(t.seq_len <= m.max_seq_len,
           f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")

    _check(moe.num_experts >= 0, f"model.moe.num_experts must be >= 0, got {moe.num_experts}")
    if moe.num_experts > 0:
        _check(moe.router in ROUTERS,
               f"model.moe.router: unknown router {moe.router!r}; known: {', '.join(sorted(ROUTERS))}")
        _check(1 <= moe.top_k <= moe.num_experts,
               f"model.moe.top_k ({moe.top_k}) must be in [1, model.moe.num_experts={moe.num_experts}]")
        _check(moe.expert_hidden >= 0, f"model.moe.expert_hidden must be >= 0, got {moe.expert_hidden}")
        _check(moe.num_shared_experts >= 0,
               f"model.moe.num_shared_experts must be >= 0, got {moe.num_shared_experts}")
        _check(moe.moe_every >= 1, f"model.moe.moe_every must be >= 1, got {moe.moe_every}")
        if moe.moe_layers is not None:
            bad = [i for i in moe.moe_layers if not 0 <= i < m.n_layers]
            _check(not bad, f"model.moe.moe_layers: {bad} out of range [0, {m.n_layers})")
        _check(len(moe_layer_ids(m)) > 0,
               f"model.moe.moe_every={moe.moe_every} selects no layer of {m.n_layers}")
        _check(moe.score_func in ("softmax", "sigmoid"),
               f"model.moe.score_func must be softmax or sigmoid, got {moe.score_func!r}")
        for key in ("aux_loss_coef", "seq_aux_loss_coef", "global_aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            value = getattr(moe, key)
            _check(0 <= value < float("inf"), f"model.moe.{key} must be >= 0 and finite, got {value}")
        _check(0 <= moe.jitter_eps < 1, f"model.moe.jitter_eps must be in [0, 1), got {moe.jitter_eps}")
        _check(moe.sinkhorn_iters >= 1, f"model.moe.sinkhorn_iters must be >= 1, got {moe.sinkhorn_iters}")
        _check(not moe.random_routing or moe.top_k == 2,
               f"model.moe.random_routing (GShard) drops the 2nd of two experts: it needs model.moe.top_k=2, "
               f"got {moe.top_k}")
        _check(moe.n_groups >= 0 and moe.topk_groups >= 0,
               f"model.moe.n_groups ({moe.n_groups}) and model.moe.topk_groups ({moe.topk_groups}) must be >= 0")
        _check((moe.n_groups > 0) == (moe.topk_groups > 0),
               f"group-limited routing needs both model.moe.n_groups and model.moe.topk_groups > 0 "
               f"(got n_groups={moe.n_groups}, topk_groups={moe.topk_groups})")
        if moe.n_groups > 0:
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
        _check(moe.drop_policy != "position" or moe.capacity_factor > 0 or moe.eval_capacity_factor > 0,
               "model.moe.drop_policy=position has no effect without a capacity: set model.moe.capacity_factor "
               "(or model.moe.eval_capacity_factor) > 0")
        _check(moe.capacity_factor >= 0,
               f"model.moe.capacity_factor must be > 0 (or 0 for dropless), got {moe.capacity_factor}")
        _check(moe.eval_capacity_factor >= 0,
               f"model.moe.eval_capacity_factor must be > 0 (or 0 for dropless), got {moe.eval_capacity_factor}")
        _check(moe.min_capacity >= 0, f"model.moe.min_capacity must be >= 0, got {moe.min_capacity}")
        _check(moe.drop_policy in ("probs", "position"),
               f"model.moe.drop_policy must be probs or position, got {moe.drop_policy!r}")
        _check(moe.dispatch in ("auto", "extension", "reference"),
               f"model.moe.dispatch must be auto, extension or reference, got {moe.dispatch!r}")
        from moe.experts import EXPERT_IMPLS

        _check(moe.experts_impl == "auto" or moe.experts_impl in EXPERT_IMPLS,
               f"model.moe.experts_impl: unknown {moe.experts_impl!r}; known: auto, {', '.join(sorted(EXPERT_IMPLS))}")
        if moe.experts_impl == "grouped":  # bf16 rows (the strictest dtype it runs in) of whole 16-byte units
            import torch

            from moe.experts import grouped_mm_shape_error

            why = grouped_mm_shape_error(m.d_model, expert_hidden(m), torch.bfloat16)
            _check(why is None, f"model.moe.experts_impl=grouped: {why}")
        ROUTERS[moe.router].validate_config(moe)
        _check(p.ep_size >= 1 and moe.num_experts % p.ep_size == 0,
               f"parallel.ep_size ({p.ep_size}) must divide model.moe.num_experts ({moe.num_experts})")
        router_cls = ROUTERS[moe.router]
        _check(p.ep_size == 1 or getattr(router_cls, "supports_expert_parallel", True),
               f"model.moe.router={moe.router} cannot run expert-parallel (parallel.ep_size={p.ep_size}): "
               f"{getattr(router_cls, 'expert_parallel_reason', 'it needs the tokens of other ranks')}; "
               f"use parallel.ep_size=1")
    _check(p.ep_size == 1 or moe.num_experts > 0,
           f"parallel.ep_size={p.ep_size} needs MoE layers (model.moe.num_experts > 0); a dense model uses 1")
    _check(p.ep_size >= 1 and world_size % p.ep_size == 0,
           f"parallel.ep_size ({p.ep_size}) must divide the world size ({world_size})")
    _check(p.timeout_s > 0, f"parallel.timeout_s must be > 0, got {p.timeout_s}")

    _check(t.steps > 0, f"train.steps must be > 0, got {t.steps}")
    _check(t.micro_batch_size > 0, f"train.micro_batch_size must be > 0, got {t.micro_batch_size}")
    gbs = global_batch_size(cfg, world_size)
    _check(gbs % (t.micro_batch_size * world_size) == 0,
           f"train.global_batch_size ({gbs}) must be a multiple of train.micro_batch_size "
           f"({t.micro_batch_size}) x data-parallel size ({world_size})")
    _check(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _check(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    _check(0 <= t.warmup_steps, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _check(t.grad_clip >= 0, f"train.grad_clip must be >= 0, got {t.grad_clip}")
    _check(t.dtype in ("auto", "fp32", "bf16"), f"train.dtype must be auto, fp32 or bf16, got {t.dtype!r}")
    _check(t.zero_stage in (0, 1, 2),
           f"train.zero_stage must be 0, 1 or 2 (DeepSpeed MoE refuses 3), got {t.zero_stage}")
    _check(t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}")
    _check(t.eval_batches > 0, f"train.eval_batches must be > 0, got {t.eval_batches}")
    _check(t.log_every > 0, f"train.log_every must be > 0, got {t.log_every}")
    _check(p.backend in ("auto", "gloo", "nccl"), f"parallel.backend must be auto, gloo or nccl, got {p.backend!r}")
    _check(cfg.checkpoint.every >= 0, f"checkpoint.every must be >= 0, got {cfg.checkpoint.every}")
    _check(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")
    _check(cfg.logging.wandb.mode in ("offline", "online", "disabled"),
           f"logging.wandb.mode must be offline, online or disabled, got {cfg.logging.wandb.mode!r}")
    _check(bool(cfg.run.name) and "/" not in cfg.run.name,
           f"run.name must be a non-empty folder name, got {cfg.run.name!r}")

    d = cfg.data
    _check(d.tokenizer != "bpe" or d.bpe_vocab_size >= 260,
           f"data.bpe_vocab_size must be >= 260, got {d.bpe_vocab_size}")
    _check(0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    _check(d.max_bytes >= 0, f"data.max_bytes must be >= 0, got {d.max_bytes}")
    if not d.dataset.startswith("embedded:"):
        looks_local = d.dataset.startswith((".", "/", "~")) or os.path.splitext(d.dataset)[1] in (
            ".txt", ".json", ".jsonl", ".parquet", ".md")
        if looks_local:
            _check(os.path.exists(os.path.expanduser(d.dataset)), f"data.dataset: file not found: {d.dataset}")
    else:
        from moe.data import EMBEDDED_CORPORA

        _check(d.dataset in EMBEDDED_CORPORA,
               f"data.dataset: unknown embedded corpus {d.dataset!r}; known: {', '.join(EMBEDDED_CORPORA)}")


def global_batch_size(cfg: Config, world_size: int) -> int:
    t = cfg.train
    return t.global_batch_size if t.global_batch_size > 0 else t.micro_batch_size * world_size


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    return global_batch_size(cfg, world_size) // (cfg.train.micro_batch_size * world_size)
