"""The typed config tree: one dataclass per component, every field documented where it is declared,
and the sizes derived from it (`dense_ffn_hidden`, `expert_hidden`, `moe_layer_ids`, the batch sizes).

Nothing here loads or checks a config: moe/config/load.py merges YAML and overrides into this tree,
moe/config/checks.py checks its fields, and moe/validate.py adds each component's own checks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple


# --------------------------------------------------------------------------------------------- model


@dataclass
class MoEConfig:
    """Mixture-of-experts FFN settings. `num_experts: 0` means every FFN is dense.

    Grouped as: layer shape; router family and scoring; routing noise; group-limited routing;
    balancing (losses and the auxiliary-loss-free bias); capacity and dropping; backends. Which
    combinations make sense is checked in `moe.validate.validate()` (and each router's `validate_config`).
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

    # --- combine
    routed_scaling_factor: float = 1.0
    """Multiply the routed experts' gate weights by this before the combine (DeepSeek-V3: 2.5 with
    sigmoid scores, whose renormalised gates sum to 1); shared experts are not scaled."""

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
    """Attention (query) heads; d_model must divide by it unless head_dim is set."""
    n_kv_heads: int = 0
    """Key/value heads; 0 = n_heads (multi-head attention). Fewer gives grouped-query attention
    (Mixtral, Qwen3: each group of n_heads / n_kv_heads query heads shares one key/value head), 1
    multi-query attention; it must divide n_heads. The KV cache holds n_kv_heads heads."""
    head_dim: int = 0
    """Width of one attention head; 0 = d_model / n_heads. Setting it decouples the heads from the
    width (Qwen3: 128 at any d_model): queries project to n_heads x head_dim, keys and values to
    n_kv_heads x head_dim, and the output projection back to d_model. Must be even (RoPE)."""
    qk_norm: str = "none"
    """RMSNorm of the queries and keys before RoPE: `none`; `head` (over each head's head_dim, one
    weight of head_dim for all heads: Qwen3); `proj` (over the whole query and key projections, of
    n_heads x head_dim and n_kv_heads x head_dim: OLMoE)."""
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
    init_from: str = ""
    """Start training (step 0, fresh optimizer) from these weights instead of the random init: a run,
    checkpoints or step folder of ours (any layout), or a local transformers folder (config.json +
    safetensors) of Llama, Qwen3, Mixtral, OLMoE or Qwen3-MoE (moe/train/init_from.py). The source's
    model must equal this config (shape, heads, norms, experts, vocabulary...; a difference is refused
    naming the key), except a dense source into an MoE config with model.upcycle. Ignored when the run
    resumes from its own checkpoint. "" = random init."""
    upcycle: str = ""
    """With a dense model.init_from and an MoE config, how the routed experts are made from each
    dense FFN (sparse upcycling, moe/nn/upcycle.py): `copy` (every expert the dense FFN; experts of
    the dense hidden size) or `granular` (the dense hidden units split into g = hidden / expert_hidden
    chunks, expert e holding chunk e mod g, its output scaled by g). Either way the upcycled model
    computes the dense model's logits at step 0. "" = no upcycling."""
    upcycle_noise: float = 0.0
    """Std of Gaussian noise added to each upcycled expert's weights, relative to the std of the dense
    matrix it was copied from (0.01 = 1%); breaks the step-0 equality, lets copies diverge sooner."""
    moe: MoEConfig = field(default_factory=MoEConfig)


# ---------------------------------------------------------------------------------------------- data


@dataclass
class DataSourceConfig:
    """One source of a data mixture (`data.sources`)."""

    name: str = ""
    """Short name: `loss/val/<name>` and the rows of the routing-by-domain matrix."""
    dataset: str = ""
    """What `data.dataset` accepts: a prepared folder, a local file or folder, `embedded:...`, a hub name."""
    weight: float = 1.0
    """Share of the training sequences drawn from this source (> 0; weights are normalised to sum 1)."""


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
    sources: List[DataSourceConfig] = field(default_factory=list)
    """A mixture: several {name, dataset, weight} blended by weight (moe/data/mixture.py), each split and
    validated on its own (`loss/val/<name>`); `data.dataset` is then unused. Every source must
    tokenize alike (`bytes`, or one pretrained tokenizer), so `bpe` is refused."""


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
    eval_tasks: List[str] = field(default_factory=list)
    """lm-eval-harness tasks run at every evaluation (moe/train/downstream.py; needs `pip install
    moe[eval]`): task, group or tag names, or task YAML files; logged as `downstream/<task>/<metric>`
    against tokens and FLOPs. Names are looked up in train.eval_include_path first, then among
    lm-eval's own tasks (their data from the hub); an unknown name stops the run before training.
    Every rank runs them in lockstep. [] = none."""
    eval_tasks_limit: int = 0
    """Documents per task at each in-loop evaluation; 0 = every document of the task."""
    eval_include_path: str = ""
    """A folder of lm-eval task YAML files searched first for train.eval_tasks; "" = lm-eval's own tasks."""
    log_every: int = 10
    """Write a metrics line every n steps."""
    compile: bool = False
    """torch.compile each transformer block (moe/parallel/engine.py `apply_compile`): the first training step
    and the first evaluation compile (seconds to a minute), later steps run the compiled code. Losses
    and router statistics equal eager's to rounding, except that routers drawing random numbers
    (noisy_gating, jitter_eps, random_routing) draw other numbers than eager does."""
    recompute: str = "none"
    """Activation recompute (moe/parallel/recompute.py): `none` keeps every activation for backward;
    `moe` recomputes each MoE layer's expert computation (permute -> experts -> unpermute, not the
    router) in backward; `full` recomputes whole transformer blocks (one extra forward per step).
    Losses, gradients and router statistics are those of `none` (statistics counted once; routing
    noise drawn again identically). Under expert parallelism a recomputed expert region exchanges its
    tokens again."""
    threads: int = 0
    """torch intra-op threads on CPU; 0 = torch's default."""
    keep_freed_memory: bool = True
    """Keep freed host memory in the process for reuse (glibc malloc: no mmap-ed blocks, no trimming;
    see moe/train/host_memory.py) so large CPU tensors are not page-faulted in anew every step; resident
    memory then stays at its peak, holes included. false: every block of 1 MiB or more is mapped on its
    own and returned when freed, so resident memory follows the live tensors, at the cost of the page
    faults (`moe bench memory` measures both). No effect off glibc."""


@dataclass
class ParallelConfig:
    ep_size: int = 1
    """Expert-parallel size: each MoE layer's experts are split over groups of this many consecutive
    ranks (E/ep_size experts per rank, tokens exchanged with all_to_all); the world is data parallel
    for everything else. Must divide model.moe.num_experts and the world size. Checkpoints are
    layout-free: a run may resume at another ep_size (moe/parallel/expert.py, moe/train/checkpoint/)."""
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


# -------------------------------------------------------------------------------------- derived sizes


def dense_ffn_hidden(m: ModelConfig) -> int:
    """Hidden size of the dense SwiGLU FFN: model.ffn_hidden, or 8/3 * d_model rounded up to 16."""
    if m.ffn_hidden > 0:
        return m.ffn_hidden
    return ((8 * m.d_model // 3) + 15) // 16 * 16


def attention_heads(m: ModelConfig) -> Tuple[int, int, int]:
    """(query heads, key/value heads, head width) with the 0 defaults resolved."""
    n_kv = m.n_kv_heads if m.n_kv_heads > 0 else m.n_heads
    head_dim = m.head_dim if m.head_dim > 0 else m.d_model // m.n_heads
    return m.n_heads, n_kv, head_dim


def expert_hidden(m: ModelConfig) -> int:
    """Hidden size of one routed (or shared) expert: model.moe.expert_hidden, or the dense FFN's."""
    return m.moe.expert_hidden if m.moe.expert_hidden > 0 else dense_ffn_hidden(m)


def moe_layer_ids(m: ModelConfig) -> List[int]:
    """The 0-based blocks with an MoE FFN (none for a dense model)."""
    if m.moe.num_experts == 0:
        return []
    if m.moe.moe_layers is not None:
        return sorted(set(m.moe.moe_layers))
    n = m.moe.moe_every
    return [i for i in range(m.n_layers) if (i + 1) % n == 0]


def global_batch_size(cfg: Config, world_size: int) -> int:
    """Sequences per optimizer step over all data-parallel ranks (0 in the config: one micro-batch each)."""
    t = cfg.train
    return t.global_batch_size if t.global_batch_size > 0 else t.micro_batch_size * world_size


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches each rank accumulates per optimizer step."""
    return global_batch_size(cfg, world_size) // (cfg.train.micro_batch_size * world_size)
