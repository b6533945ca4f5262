"""One typed config tree for every run.

Each component owns a small dataclass whose fields are documented where they are declared. A run's
config is merged as: dataclass defaults < YAML file(s) < dotted command-line overrides
(`model.n_layers=4`). Unknown keys and wrong types are rejected by OmegaConf's structured merge;
`validate()`, which runs before any model or data is built and before anything is written, checks
the range of every numeric knob (`RANGES`: finite, and sizes capped) and then the cross-field
constraints, component by component. Every error is a one-line `ConfigError` naming the offending
key (or file). The dumps that get written (`to_yaml`, `to_dict`) never hold a secret's value.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe.errors import ConfigError  # re-exported: `from moe.config import ConfigError`
from moe.io import REDACTED, SECRET_NAME, redact, secret_values


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
    """Expert computation backend by registry name (see moe/nn/experts.py): `loop` (one GEMM per expert;
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
    """torch.compile each transformer block (moe/parallel/__init__.py `apply_compile`): the first training step
    and the first evaluation compile (seconds to a minute), later steps run the compiled code. Losses
    and router statistics equal eager's to rounding, except that routers drawing random numbers
    (noisy_gating, jitter_eps, random_routing) draw other numbers than eager does."""
    threads: int = 0
    """torch intra-op threads on CPU; 0 = torch's default."""
    keep_freed_memory: bool = True
    """Keep freed host memory in the process for reuse (glibc malloc: no mmap-ed blocks, no trimming;
    see moe/train/host_memory.py) so large CPU tensors are not page-faulted in anew every step; resident
    memory then stays at its peak. No effect off glibc."""


@dataclass
class ParallelConfig:
    ep_size: int = 1
    """Expert-parallel size: each MoE layer's experts are split over groups of this many consecutive
    ranks (E/ep_size experts per rank, tokens exchanged with all_to_all); the world is data parallel
    for everything else. Must divide model.moe.num_experts and the world size. Checkpoints are
    layout-free: a run may resume at another ep_size (moe/parallel/expert.py, moe/train/checkpoint/__init__.py)."""
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

YAML_SUFFIXES = (".yaml", ".yml")

# One layer of the merge and what an error in it is blamed on: a file path or `override 'k=v'`.
Layer = Tuple[str, dict]


def _error_key(exc: OmegaConfBaseException) -> str:
    """OmegaConf's message, one line, with the key it is about in front."""
    key = getattr(exc, "full_key", None) or ""
    msg = (getattr(exc, "msg", None) or str(exc) or type(exc).__name__).splitlines()[0]
    return f"{key}: {msg}" if key else msg


def _config_error(message: str) -> ConfigError:
    # an error may quote a value resolved from `${oc.env:...}`: never print a secret's value
    return ConfigError(redact(message))


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """defaults < YAML at `path` (may list `defaults: [other.yaml]` to layer files) < overrides.

    An int field also takes an integral float (`data.max_bytes=1e6`, `steps: 2.0e3`): OmegaConf alone
    refuses them, and a size written in e-notation is what people type. A fractional or non-finite
    float there is refused naming the key. Every error is a one-line ConfigError naming the key, the
    file or the override; nothing is written."""
    layers: List[Layer] = []
    if path is not None:
        layers.extend(_yaml_layers(path, seen=()))
    layers.extend(_override_layer(ov) for ov in overrides or [])
    merged = _merge(layers)
    try:  # resolves interpolations (`${oc.env:...}`): errors name the key, not the layer
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _config_error(_error_key(exc)) from None
    if path is not None and not any(_sets_run_name(layer) for _, layer in layers):
        cfg.run.name = os.path.splitext(os.path.basename(path))[0]
    return cfg


@functools.cache
def _schema() -> Any:
    """The defaults as an OmegaConf tree, built once (building it is most of a load's time); merging
    copies it, so it is never changed."""
    return OmegaConf.structured(Config)


def _merge(layers: List[Layer]) -> Any:
    """The layers over the schema in one merge (the fast path); after an error, again one at a time,
    so that the error names the file or override with the unknown key or the wrong type."""
    try:
        return OmegaConf.merge(_schema(), *(layer for _, layer in layers))
    except OmegaConfBaseException as exc:
        error = _error_key(exc)
    merged = copy.deepcopy(_schema())
    for source, layer in layers:
        try:
            merged.merge_with(layer)
        except OmegaConfBaseException as exc:
            raise _config_error(f"{source}: {_error_key(exc)}") from None
    raise _config_error(error)


def _sets_run_name(layer: dict) -> bool:
    run = layer.get("run")
    return isinstance(run, dict) and run.get("name") is not None


def _override_layer(ov: str) -> Layer:
    source = f"override {ov!r}"
    if "=" not in ov:
        raise _config_error(f"{source}: expected key=value (for example model.n_layers=4)")
    key = ov.split("=", 1)[0]
    if key.startswith(("+", "~")):
        raise _config_error(f"{source}: adding or removing keys is not allowed")
    try:  # resolve=False: interpolations stay text until the whole config resolves them
        layer = OmegaConf.to_container(OmegaConf.from_dotlist([ov]), resolve=False)
    except OmegaConfBaseException as exc:
        raise _config_error(f"{source}: {_error_key(exc)}") from None
    return source, _integral_floats_to_int(layer, Config, "", source)


def _yaml_layers(path: str, seen: tuple) -> List[Layer]:
    """The layers of one YAML file: its `defaults` (each a YAML file relative to it), then itself."""
    if not path.lower().endswith(YAML_SUFFIXES):
        # checked before opening it: `defaults: [/etc/passwd]` must not get as far as a parse error
        raise _config_error(f"{path}: not a YAML config file (the name must end in .yaml or .yml)")
    if not os.path.isfile(path):
        raise _config_error(f"config file not found: {path}")
    real = os.path.realpath(path)
    if real in seen:
        raise _config_error(f"{path}: `defaults` includes itself")
    raw = _read_yaml_mapping(path)
    layers: List[Layer] = []
    if "defaults" in raw:
        parents = raw.pop("defaults")
        if isinstance(parents, str):
            parents = [parents]
        if not isinstance(parents, list) or not all(isinstance(p, str) and p for p in parents):
            raise _config_error(f"{path}: `defaults` must be a list of YAML file names (relative to this file)")
        for parent in parents:
            layers.extend(_yaml_layers(os.path.join(os.path.dirname(path), parent), seen + (real,)))
    layers.append((path, _integral_floats_to_int(raw, Config, "", path)))
    return layers


def _read_yaml_mapping(path: str) -> dict:
    """The file's top-level mapping as plain data (interpolations kept as text). Errors name the
    file and the line and column, never the text: the file may not be a config at all."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise _config_error(f"{path}: not a YAML config file (not UTF-8 text)") from None
    except OSError as exc:
        raise _config_error(f"{path}: cannot read it: {exc.strerror}") from None
    try:
        # composing gives the document's shape without building it: empty, a mapping or not
        node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if node is None or node.tag.endswith(":null"):  # nothing but comments: it would train the defaults
            raise _config_error(f"{path}: the file is empty (or only comments); a config sets at least one key")
        if not isinstance(node, yaml.MappingNode):
            raise _config_error(f"{path}: top level must be a mapping of config keys (key: value lines)")
        layer = OmegaConf.create(text)  # OmegaConf's loader: 1e3 is a float, duplicate keys are errors
    except yaml.YAMLError as exc:
        raise _config_error(f"{path}: invalid YAML{_yaml_position(exc)}") from None
    except OmegaConfBaseException as exc:
        raise _config_error(f"{path}: {_error_key(exc)}") from None
    return OmegaConf.to_container(layer, resolve=False)  # type: ignore[return-value]


def _yaml_position(exc: yaml.YAMLError) -> str:
    """` at line L, column C` of a YAML error (PyYAML's message would quote the text)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _integral_floats_to_int(layer: dict, cls: type, prefix: str, source: str) -> dict:
    """Turn the integral floats of `layer`'s int fields (schema: dataclass `cls`) into ints, in place."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in layer:
            continue
        key, value, hint = prefix + f.name, layer[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            _integral_floats_to_int(value, hint, key + ".", source)
        elif hint is int:
            layer[f.name] = _as_int(value, key, source)
        elif hint == Optional[List[int]] and isinstance(value, list):
            layer[f.name] = [_as_int(v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    return layer


def _as_int(value: Any, key: str, source: str) -> Any:
    if not isinstance(value, float):
        return value  # ints pass; anything else is OmegaConf's to refuse (it names the key)
    if not (math.isfinite(value) and value.is_integer()):
        raise _config_error(f"{source}: {key} wants an integer, got {value}")
    return int(value)


def to_dict(cfg: Config) -> dict:
    """The config as plain data for what is written or logged (W&B's config, comparing a run folder's
    config): values of secret-named environment variables (`${oc.env:HF_TOKEN}`) read <redacted>.
    The Config itself keeps them."""
    return _replace_secrets(dataclasses.asdict(cfg), lambda name: REDACTED)


def to_yaml(cfg: Config) -> str:
    """The config as YAML for the run folder's and checkpoints' config.yaml. A secret's value is written
    as `${oc.env:NAME,'<redacted>'}`: no file holds it, and a job that trains from the file (`moe
    launch`) or a resumed run gets it back from its own environment (or `<redacted>` without it)."""
    data = _replace_secrets(dataclasses.asdict(cfg), lambda name: f"${{oc.env:{name},'{REDACTED}'}}")
    return OmegaConf.to_yaml(OmegaConf.create(data))


def _replace_secrets(data: Any, replacement) -> Any:
    """`data` with each secret value inside its strings replaced by `replacement(env var name)`."""
    secrets = secret_values()  # longest first, so that a secret containing another is replaced whole
    if not secrets:
        return data
    # one pass, so that no secret is looked for inside a replacement; several names for one value: the first
    pattern = re.compile("|".join(re.escape(v) for v in secrets))
    names = {v: k for k, v in sorted(os.environ.items(), reverse=True) if v in secrets and SECRET_NAME.search(k)}

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, str):
            return pattern.sub(lambda m: replacement(names[m.group()]), x)
        return x

    return walk(data)


def config_from_yaml_text(text: str) -> Config:
    """A config as stored in a run folder or checkpoint (written by to_yaml)."""
    try:
        merged = OmegaConf.merge(_schema(), OmegaConf.create(text))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _config_error(_error_key(exc)) from None
    except yaml.YAMLError as exc:  # a damaged file: where, not what
        raise _config_error(f"invalid YAML{_yaml_position(exc)}") from None


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
# table of 1e12 rows. (tests/test_config_validation.py checks that every numeric field is listed.)
RANGES: Dict[str, Range] = {
    # model
    "model.vocab_size": Range(0, 2**24, why="0 = from the tokenizer"),
    "model.d_model": Range(1, 2**16),
    "model.n_layers": Range(1, 2**10),
    "model.n_heads": Range(1, 2**16),
    "model.ffn_hidden": Range(0, 2**18, why="0 = 8/3 x model.d_model"),
    "model.max_seq_len": Range(1, 2**20, why="the RoPE tables have this many rows"),
    "model.rope_theta": Range(1, 1e12, lo_open=True, why="the RoPE frequencies theta**(-2i/d) fall only for theta > 1"),
    "model.norm_eps": Range(1e-30, 1, why="0, or below fp32's range, divides a zero vector by zero"),
    "model.init_std": Range(0, 1, lo_open=True),
    # model.moe (moe_layers, a list, is checked in _validate_moe)
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

MAX_PARAMS = 2**40
"""More parameters than this (4 TiB in fp32) is a typo in a size, refused before anything is allocated."""
MAX_ROPE_ENTRIES = 2**30
"""RoPE table entries (max_seq_len x head size, fp32 cos and sin: 4 GiB), allocated in every process."""
MAX_NAME_BYTES = 200
"""Longest run or sweep name: a file system allows 255 bytes, and `<name>.old-<time>` must fit too."""


def validate(cfg: Config, world_size: int = 1) -> None:
    """Ranges, then cross-field checks, component by component; raises a ConfigError naming the key.
    Runs before anything heavy and before anything is written."""
    _check_ranges(cfg)
    _validate_model(cfg.model)
    _validate_moe(cfg.model, cfg.parallel)
    _validate_parallel(cfg, world_size)
    _validate_train(cfg, world_size)
    _validate_checkpoint_and_logging(cfg)
    _validate_run(cfg.run)
    _validate_data(cfg.data)


def _check_ranges(cfg: Config) -> None:
    for key, rng in RANGES.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        _check(value in rng, f"{key} must be {rng.describe()}, got {value}")


def _validate_model(m: ModelConfig) -> None:
    _check(m.d_model % m.n_heads == 0, f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    head = m.d_model // m.n_heads
    _check(head % 2 == 0, f"model.d_model / model.n_heads must be even for RoPE, got {head}")
    rope = m.max_seq_len * head
    _check(rope <= MAX_ROPE_ENTRIES,
           f"model.max_seq_len ({m.max_seq_len}) x head size ({head}) = {rope} RoPE table entries, more than "
           f"{_fmt(MAX_ROPE_ENTRIES)} ({MAX_ROPE_ENTRIES * 4 // 2**30} GiB); lower model.max_seq_len")
    params = _params_upper_bound(m)
    _check(params <= MAX_PARAMS,
           f"model: up to {params:.3g} parameters, more than {_fmt(MAX_PARAMS)}: lower model.d_model, model.n_layers, "
           f"model.vocab_size, model.ffn_hidden or model.moe.num_experts / expert_hidden")


def _params_upper_bound(m: ModelConfig) -> int:
    """At least the model's parameter count, from the config alone (moe/tools/match.py counts it exactly,
    but needs the vocabulary; an unresolved one, 0, counts nothing here)."""
    d, e = m.d_model, m.moe
    dense = 3 * d * dense_ffn_hidden(m)
    moe = (e.num_experts + e.num_shared_experts) * 3 * d * expert_hidden(m) + e.num_experts * d
    per_layer = 4 * d * d + 2 * d + max(dense, moe if e.num_experts else 0)
    return m.n_layers * per_layer + m.vocab_size * d * (1 if m.tie_embeddings else 2) + d


def _validate_moe(m: ModelConfig, p: ParallelConfig) -> None:
    """MoE knobs matter only with experts (a dense model ignores them); the router family checks its own."""
    from moe.routing import ROUTERS  # late import: routing imports config

    moe = m.moe
    if moe.num_experts == 0:
        return
    _check(moe.router in ROUTERS,
           f"model.moe.router: unknown router {moe.router!r}; known: {', '.join(sorted(ROUTERS))}")
    _check(moe.top_k <= moe.num_experts,
           f"model.moe.top_k ({moe.top_k}) must be in [1, model.moe.num_experts={moe.num_experts}]")
    if moe.moe_layers is not None:
        bad = [i for i in moe.moe_layers if not 0 <= i < m.n_layers]
        _check(not bad, f"model.moe.moe_layers: {bad} out of range [0, {m.n_layers})")
    _check(len(moe_layer_ids(m)) > 0, f"model.moe.moe_every={moe.moe_every} selects no layer of {m.n_layers}")
    _check(moe.score_func in ("softmax", "sigmoid"),
           f"model.moe.score_func must be softmax or sigmoid, got {moe.score_func!r}")
    _check(not moe.random_routing or moe.top_k == 2,
           f"model.moe.random_routing (GShard) drops the 2nd of two experts: it needs model.moe.top_k=2, "
           f"got {moe.top_k}")
    _validate_moe_groups(moe)
    _check(moe.drop_policy in ("probs", "position"),
           f"model.moe.drop_policy must be probs or position, got {moe.drop_policy!r}")
    _check(moe.drop_policy != "position" or moe.capacity_factor > 0 or moe.eval_capacity_factor > 0,
           "model.moe.drop_policy=position has no effect without a capacity: set model.moe.capacity_factor "
           "(or model.moe.eval_capacity_factor) > 0")
    _check(moe.dispatch in ("auto", "extension", "reference"),
           f"model.moe.dispatch must be auto, extension or reference, got {moe.dispatch!r}")
    from moe.nn.experts import EXPERT_IMPLS

    _check(moe.experts_impl == "auto" or moe.experts_impl in EXPERT_IMPLS,
           f"model.moe.experts_impl: unknown {moe.experts_impl!r}; known: auto, {', '.join(sorted(EXPERT_IMPLS))}")
    if moe.experts_impl == "grouped":  # bf16 rows (the strictest dtype it runs in) of whole 16-byte units
        import torch

        from moe.nn.experts import grouped_mm_shape_error

        why = grouped_mm_shape_error(m.d_model, expert_hidden(m), torch.bfloat16)
        _check(why is None, f"model.moe.experts_impl=grouped: {why}")
    router_cls = ROUTERS[moe.router]
    router_cls.validate_config(moe)
    _check(moe.num_experts % p.ep_size == 0,
           f"parallel.ep_size ({p.ep_size}) must divide model.moe.num_experts ({moe.num_experts})")
    _check(p.ep_size == 1 or getattr(router_cls, "supports_expert_parallel", True),
           f"model.moe.router={moe.router} cannot run expert-parallel (parallel.ep_size={p.ep_size}): "
           f"{getattr(router_cls, 'expert_parallel_reason', 'it needs the tokens of other ranks')}; "
           f"use parallel.ep_size=1")


def _validate_moe_groups(moe: MoEConfig) -> None:
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


def _validate_parallel(cfg: Config, world_size: int) -> None:
    p = cfg.parallel
    _check(p.ep_size == 1 or cfg.model.moe.num_experts > 0,
           f"parallel.ep_size={p.ep_size} needs MoE layers (model.moe.num_experts > 0); a dense model uses 1")
    _check(world_size % p.ep_size == 0, f"parallel.ep_size ({p.ep_size}) must divide the world size ({world_size})")
    _check(p.backend in ("auto", "gloo", "nccl"), f"parallel.backend must be auto, gloo or nccl, got {p.backend!r}")


def _validate_train(cfg: Config, world_size: int) -> None:
    t = cfg.train
    _check(t.seq_len <= cfg.model.max_seq_len,
           f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    gbs = global_batch_size(cfg, world_size)
    _check(gbs % (t.micro_batch_size * world_size) == 0,
           f"train.global_batch_size ({gbs}) must be a multiple of train.micro_batch_size "
           f"({t.micro_batch_size}) x data-parallel size ({world_size})")
    _check(t.dtype in ("auto", "fp32", "bf16"), f"train.dtype must be auto, fp32 or bf16, got {t.dtype!r}")


def _validate_checkpoint_and_logging(cfg: Config) -> None:
    # checkpoint.every and keep_last are plain ranges (RANGES)
    _check(cfg.logging.wandb.mode in ("offline", "online", "disabled"),
           f"logging.wandb.mode must be offline, online or disabled, got {cfg.logging.wandb.mode!r}")


def _validate_run(run: RunConfig) -> None:
    # run.root may be any path; run.name is one folder inside it
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


def _validate_data(d: DataConfig) -> None:
    _check(d.tokenizer != "bpe" or d.bpe_vocab_size >= 260,
           f"data.bpe_vocab_size must be >= 260 with data.tokenizer=bpe, got {d.bpe_vocab_size}")
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
