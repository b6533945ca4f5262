"""`moe plan`: will a run fit, and how long will it take? Sizes, per-rank memory by term, a verdict.

Everything is arithmetic on the config, except the parameter counts, which come from the model built
on the meta device (`moe.nn.accounting.param_counts`: seconds and no memory, Mixtral-8x7B included).
The memory terms follow what `moe train` runs, read from the code:

- weights, gradients, optimizer states: the DeepSpeed 0.19 paths `moe/parallel/engine.py` configures
  (`state_bytes`). The routed experts are sharded over parallel.ep_size ranks and their ZeRO partitions
  span the expert-data-parallel group (world / ep_size); everything else is replicated and partitioned
  over the whole data-parallel world. bf16 (GPU) keeps an fp32 master copy and fp32 Adam moments; with
  ZeRO 2 and ep_size 1 the three terms equal DeepSpeed's own `estimate_zero2_model_states_mem_needs`
  (2 + 18 / world bytes per parameter).
- activations: what the model saves for backward per token and layer (moe/nn/accounting.py
  `activation_bytes_per_token`: RMSNorm in fp32, SDPA's q/k/v/output/log-sum-exp, the SwiGLU hidden,
  the router's logits and scores, the expert-sorted rows top_k times, the experts' hidden, the
  combine's inputs), times micro_batch_size x seq_len, following train.recompute; plus the logits and
  fp32 log-probabilities. tests/unit/nn/test_accounting.py checks the per-token bytes against the
  tensors autograd actually saves.
- buffers: the largest MoE layer's backward workspace, the all-to-all send/receive rows under EP, the
  loss's gradient and DeepSpeed's gradient reduction bucket (torch's fused AdamW steps each tensor in
  place, with no temporaries: moe/parallel/engine.py).
- overhead: a fixed framework term (CUDA context, NCCL, allocator slack on a GPU: an estimate, not
  calibrated on a GPU yet); on the CPU the process baseline of Python + torch + DeepSpeed + the data
  pipeline, measured by benchmarks/plan.py, plus the storage the build frees (`freed_at_build`), which
  the default host-memory policy keeps resident.

The terms are summed: gradients and activations are counted as if they lived at the same time (they
do under gradient accumulation). On the CPU the sum came within 12% of the measured peak resident
memory of the ranks of real runs (ep 1/2, ZeRO 0/2, two micro-batch sizes: benchmarks/plan.py,
BENCHMARKS.md; one ZeRO 2 rank in one run of four 20% above it); on a GPU it is not yet measured.
"""
from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch

from moe.config import Config, ConfigError, expert_hidden, global_batch_size
from moe.nn.accounting import activation_bytes_per_token, flops_per_token, param_counts

GB = 10 ** 9
GIB = 2 ** 30
REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default reduce/all-reduce bucket (elements): `zero_optimization.reduce_bucket_size`,
and the engine's `allreduce_bucket_size`; moe/parallel/engine.py keeps both defaults."""
GPU_OVERHEAD = 2 * GIB
"""Fixed per-GPU framework memory: CUDA context and kernels (~0.5-1 GiB on Hopper), NCCL's
communicators and the caching allocator's slack. An estimate from the usual figures, not calibrated
on this project's runs."""
CPU_BASELINE = {1: 366 * 2 ** 20, 2: 366 * 2 ** 20}
"""Resident memory of one `moe train` process before any model term (Python, torch, DeepSpeed, gloo,
the embedded corpus' token cache), by world size; measured by benchmarks/plan.py (BENCHMARKS.md)."""
TERMS = ("weights", "gradients", "optimizer", "activations", "buffers", "overhead")


@dataclass
class Layout:
    """Where the run trains: nodes x gpus_per_node ranks, each with `memory` bytes."""

    nodes: int = 1
    gpus_per_node: int = 8
    memory: float = 80 * GB
    peak_tflops: float = 989.0
    """Dense bf16 peak of one GPU (H100 SXM: 989)."""
    mfu: float = 0.4
    device: str = "cuda"
    """`cuda` (bf16 when train.dtype=auto, grouped experts) or `cpu` (fp32, host memory: calibration)."""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Plan:
    """The estimate for one config on one layout. Memory in bytes per rank, by term."""

    layout: Layout
    params_total: int
    params_active: int
    params_embedding: int
    params_expert: int
    params_per_rank: int
    flops_per_token: float
    dtype: str
    memory: Dict[str, float]
    detail: Dict[str, float]
    tokens: int
    tokens_per_s: float
    seconds: float
    build_peak: float
    """Bytes per rank while the model is built: moe/train/build.py moves the whole model, every expert,
    in fp32 to the device before expert parallelism shards it and DeepSpeed casts it to bf16."""
    fits: Optional[bool]
    """Whether the step's total and the build fit the device memory (None on a CPU layout)."""
    largest: str
    advice: List[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.memory.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d


# ------------------------------------------------------------------------------------ inputs


def parse_memory(text: str) -> float:
    """'80GB', '80 GiB', '141G', '512MB' -> bytes (GB = 1e9, GiB = 2^30; a bare number is GB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size such as 80GB, 141GB or 96GiB")
    unit = (m.group(2) or "G").upper()
    base = 1024 if m.group(3) else 1000
    return float(m.group(1)) * base ** "KMGT".index(unit) * base


def vocab_known(cfg: Config) -> bool:
    """Whether the vocabulary size is known without loading a tokenizer (set, or bytes/bpe)."""
    return cfg.model.vocab_size > 0 or cfg.data.tokenizer in ("bytes", "bpe")


def resolve_vocab(cfg: Config) -> Config:
    """A copy of cfg whose model.vocab_size is known without loading data (bytes: 257, bpe: its size)."""
    if cfg.model.vocab_size > 0:
        return cfg
    known = {"bytes": 257, "bpe": cfg.data.bpe_vocab_size}
    if not vocab_known(cfg):
        raise ConfigError(f"model.vocab_size: set it to plan a config using tokenizer {cfg.data.tokenizer!r}")
    cfg = copy.deepcopy(cfg)
    cfg.model.vocab_size = known[cfg.data.tokenizer]
    return cfg


def check_layout(layout: Layout) -> None:
    for name, value in (("--nodes", layout.nodes), ("--gpus-per-node", layout.gpus_per_node)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if not 0 < layout.mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {layout.mfu}")
    if layout.peak_tflops <= 0:
        raise ConfigError(f"--peak-tflops must be > 0, got {layout.peak_tflops}")
    if layout.device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be cuda or cpu, got {layout.device!r}")


# ------------------------------------------------------------------------------------ model states


def state_bytes(params: float, partitions: int, zero_stage: int, param_bytes: int) -> Dict[str, float]:
    """Weights, gradients and optimizer states of `params` parameters held by a rank whose ZeRO
    partitions span `partitions` ranks, as DeepSpeed 0.19 allocates them with torch AdamW:

    - stage 0, fp32: the parameters, their gradients, Adam's two moments.
      stage 0, bf16 (FP16_UnfusedOptimizer): bf16 weights and gradients, fp32 master weights and
      moments (12 B), fp32 gradient copies at the step (4 B).
    - stage 1 (DeepSpeedZeroOptimizer): full low-precision weights and gradients; the fp32 master
      partition (a copy in fp32 training too), the moments and the fp32 gradient partition of the
      step, each 1 / partitions.
    - stage 2: as stage 1, with the low-precision gradients partitioned too.
    """
    w, n = param_bytes, partitions
    if zero_stage == 0:
        return {"weights": w * params, "gradients": w * params + (4 * params if w != 4 else 0),
                "optimizer": (12 if w != 4 else 8) * params}
    grads = w * params if zero_stage == 1 else w * params / n
    return {"weights": w * params, "gradients": grads + 4 * params / n, "optimizer": 12 * params / n}


# ------------------------------------------------------------------------------------ the plan


def dtype_bytes(cfg: Config, device: str) -> Tuple[str, int]:
    name = cfg.train.dtype if cfg.train.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    return name, 2 if name == "bf16" else 4


def freed_at_build(cfg: Config, counts: Dict[str, int], param_bytes: int) -> float:
    """Bytes the build allocates and frees before training: the experts other ranks keep (the model is
    built whole, then sharded: moe/parallel/expert.py) and, under ZeRO 1/2, every parameter's own
    storage (DeepSpeed copies them into one flat buffer and makes them views of it). Freed, they leave
    holes that only smaller tensors reuse; with train.keep_freed_memory a CPU process keeps them."""
    ep = cfg.parallel.ep_size if cfg.model.moe.num_experts else 1
    experts = counts["params_expert"]
    freed = 4 * experts * (ep - 1) / ep
    if cfg.train.zero_stage > 0:
        freed += param_bytes * (counts["params_total"] - experts + experts / ep)
    return freed


def memory_terms(cfg: Config, counts: Dict[str, int], layout: Layout) -> Tuple[Dict[str, float], Dict[str, float]]:
    """(the six terms, their parts) in bytes per rank."""
    m, t, W = cfg.model, cfg.train, layout.world
    ep = cfg.parallel.ep_size if m.moe.num_experts else 1
    _, w = dtype_bytes(cfg, layout.device)
    a = w  # activations are in the autocast dtype
    experts, other = counts["params_expert"] / ep, counts["params_total"] - counts["params_expert"]
    states = state_bytes(other, W, t.zero_stage, w)
    for key, value in state_bytes(experts, max(1, W // ep), t.zero_stage, w).items():
        states[key] += value
    tokens = t.micro_batch_size * t.seq_len
    recompute = getattr(t, "recompute", "none")
    act = activation_bytes_per_token(m, a, layout.device, ep, recompute)
    detail = {"activations_layers": tokens * act["layers"], "activations_recomputed_block": tokens * act["block_max"],
              "activations_head": tokens * act["head"]}
    if m.moe.num_experts:
        k, h, d = m.moe.top_k, expert_hidden(m), m.d_model
        detail["buffers_moe_backward"] = tokens * k * (2 * d + 3 * h) * a  # grads of rows, hidden, outputs
        detail["buffers_all_to_all"] = tokens * k * d * a * 2 if ep > 1 else 0.0  # send + receive rows
    detail["buffers_loss_grad"] = tokens * m.vocab_size * 4
    groups = (other, experts)  # DeepSpeed reduces expert parameters in groups of their own
    if layout.device == "cuda" and t.zero_stage == 2:  # the contiguous gradient bucket, allocated whole
        detail["buffers_reduce_bucket"] = REDUCE_BUCKET * w
    else:  # the flat copy of a group's gradients for the all-reduce (touched as far as it is filled on a CPU)
        detail["buffers_reduce_bucket"] = min(REDUCE_BUCKET, max(groups)) * w
    memory = dict(states)
    memory["activations"] = sum(v for k_, v in detail.items() if k_.startswith("activations"))
    memory["buffers"] = sum(v for k_, v in detail.items() if k_.startswith("buffers"))
    if layout.device == "cuda":
        detail["overhead_framework"] = GPU_OVERHEAD
    else:
        detail["overhead_process"] = CPU_BASELINE.get(W, CPU_BASELINE[2])
        if t.keep_freed_memory:  # storage the build replaced stays in the heap (moe/train/host_memory.py)
            detail["overhead_freed_at_build"] = freed_at_build(cfg, counts, w)
    memory["overhead"] = sum(v for k_, v in detail.items() if k_.startswith("overhead"))
    return {k_: memory[k_] for k_ in TERMS}, detail


def estimate(cfg: Config, layout: Layout, counts: Optional[Dict[str, int]] = None, tokens: Optional[int] = None,
             advise: bool = True) -> Plan:
    """The plan of `cfg` (validated for layout.world) on `layout`; `counts` from `param_counts` (built
    on meta when not given), `tokens` to train (default train.steps x global batch x seq_len)."""
    check_layout(layout)
    cfg = resolve_vocab(cfg)
    counts = counts or param_counts(cfg.model)
    W = layout.world
    ep = cfg.parallel.ep_size if cfg.model.moe.num_experts else 1
    memory, detail = memory_terms(cfg, counts, layout)
    flops = flops_per_token(cfg.model, cfg.train.seq_len)["flops_per_token"]
    tokens = tokens if tokens is not None else cfg.train.steps * global_batch_size(cfg, W) * cfg.train.seq_len
    tokens_per_s = W * layout.peak_tflops * 1e12 * layout.mfu / flops
    experts = counts["params_expert"]
    # start-up: the model is built on meta and each rank materialises only what it holds (its experts and
    # the rest), in fp32, before DeepSpeed converts it (moe/parallel/engine.py materialize_model)
    build_peak = 4 * (counts["params_total"] - experts + experts / ep) + memory["overhead"]
    fits = None if layout.device == "cpu" else max(sum(memory.values()), build_peak) <= layout.memory
    largest = max(("weights", "gradients", "optimizer", "activations", "buffers"), key=lambda k: memory[k])
    plan = Plan(layout=layout, params_total=counts["params_total"], params_active=counts["params_active"],
                params_embedding=counts["params_embedding"], params_expert=counts["params_expert"],
                params_per_rank=int(counts["params_total"] - counts["params_expert"] + counts["params_expert"] / ep),
                flops_per_token=flops, dtype=dtype_bytes(cfg, layout.device)[0], memory=memory, detail=detail,
                tokens=tokens, tokens_per_s=tokens_per_s, seconds=tokens / tokens_per_s, build_peak=build_peak,
                fits=fits, largest=largest)
    if advise and fits is False and plan.total > layout.memory:
        plan.advice = advice(cfg, layout, counts, largest)
    return plan


# the knobs that shrink each term, most effective first
KNOBS = {"weights": ("ep", "zero"), "gradients": ("zero", "ep"), "optimizer": ("zero", "ep"),
         "activations": ("recompute", "mbs", "ep"), "buffers": ("mbs", "zero", "ep")}


def _candidates(cfg: Config, layout: Layout, knob: str) -> List[Tuple[str, Config]]:
    t, out = cfg.train, []
    if knob == "zero":
        out = [(f"train.zero_stage={z}", _with(cfg, "train", zero_stage=z)) for z in (1, 2) if z > t.zero_stage]
    elif knob == "ep" and cfg.model.moe.num_experts:
        E = cfg.model.moe.num_experts
        out = [(f"parallel.ep_size={p}", _with(cfg, "parallel", ep_size=p)) for p in range(cfg.parallel.ep_size + 1, E + 1)
               if E % p == 0 and layout.world % p == 0]
    elif knob == "recompute" and hasattr(t, "recompute"):
        modes = ("moe", "full") if cfg.model.moe.num_experts else ("full",)
        current = getattr(t, "recompute", "none")
        order = ("none", "moe", "full")
        out = [(f"train.recompute={r}", _with(cfg, "train", recompute=r)) for r in modes
               if order.index(r) > order.index(current)]
    elif knob == "mbs":
        mbs, gbs = t.micro_batch_size // 2, global_batch_size(cfg, layout.world)
        while mbs >= 1:
            if gbs % (mbs * layout.world) == 0:
                out.append((f"train.micro_batch_size={mbs}", _with(cfg, "train", micro_batch_size=mbs,
                                                                   global_batch_size=gbs)))
            mbs //= 2
    return out


def _with(cfg: Config, section: str, **values) -> Config:
    new = copy.copy(cfg)
    setattr(new, section, replace(getattr(cfg, section), **values))
    return new


def advice(cfg: Config, layout: Layout, counts: Dict[str, int], largest: str) -> List[str]:
    """Overrides that make the plan fit: at each round the first single knob that fits (the knobs of
    the largest term first), else the one that helps most, kept, and another round (four at most).
    Returns the overrides and their total, or what helps most when nothing fits."""
    chosen: List[str] = []
    total = sum(memory_terms(cfg, counts, layout)[0].values())
    for _ in range(4):
        terms = memory_terms(cfg, counts, layout)[0]
        largest = max(KNOBS, key=lambda k: terms[k])
        knobs = KNOBS[largest] + tuple(k for k in ("zero", "ep", "recompute", "mbs") if k not in KNOBS[largest])
        best = None
        for knob in knobs:
            for text, new in _candidates(cfg, layout, knob):
                new_total = sum(memory_terms(new, counts, layout)[0].values())
                if new_total <= layout.memory:
                    return ["try " + " ".join(chosen + [text]) + f" (total {fmt_bytes(new_total)})"]
                if best is None or new_total < best[2]:
                    best = (text, new, new_total)
        if best is None or best[2] >= total:
            break
        chosen.append(best[0])
        cfg, total = best[1], best[2]
    if not chosen:
        return [f"no knob shrinks it on {layout.world} GPUs: more GPUs or a smaller model"]
    return [f"nothing fits on {layout.world} GPUs with these knobs; {' '.join(chosen)} comes closest "
            f"(total {fmt_bytes(total)}): more GPUs"]


# ------------------------------------------------------------------------------------ reports


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.1f} MiB"


def fmt_time(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def fmt_count(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def verdict(plan: Plan) -> str:
    lay = plan.layout
    if plan.fits is None:
        return f"estimated peak {fmt_bytes(plan.total)} of host memory per process (CPU: no device memory to check)"
    if plan.fits:
        return f"fits: {fmt_bytes(plan.total)} of {fmt_bytes(lay.memory)} per GPU"
    if plan.total <= lay.memory:
        return (f"does not fit at start-up: building the model needs {fmt_bytes(plan.build_peak)} > "
                f"{fmt_bytes(lay.memory)} per GPU (each rank materialises its weights in fp32 before DeepSpeed "
                f"converts them); training itself needs {fmt_bytes(plan.total)}")
    head = (f"does not fit: {fmt_bytes(plan.total)} > {fmt_bytes(lay.memory)} per GPU; largest term {plan.largest} "
            f"({fmt_bytes(plan.memory[plan.largest])})")
    return head + "".join(f"; {a}" for a in plan.advice)


def report(plan: Plan, name: str = "") -> str:
    """The readable table `moe plan` prints."""
    lay = plan.layout
    lines = [f"plan {name}: {lay.nodes} node(s) x {lay.gpus_per_node} = {lay.world} {lay.device} rank(s), "
             f"{plan.dtype}",
             f"  params total {fmt_count(plan.params_total)}, active {fmt_count(plan.params_active)}, embedding "
             f"{fmt_count(plan.params_embedding)}, routed experts {fmt_count(plan.params_expert)}; on each rank "
             f"{fmt_count(plan.params_per_rank)}",
             f"  training FLOPs/token {plan.flops_per_token:.3e}", "", "  | memory per rank | bytes | share |",
             "  |---|---:|---:|"]
    for term in TERMS:
        lines.append(f"  | {term} | {fmt_bytes(plan.memory[term])} | {100 * plan.memory[term] / plan.total:.0f}% |")
    lines.append(f"  | **total** | **{fmt_bytes(plan.total)}** | |")
    lines += ["", f"  {verdict(plan)}"]
    if lay.device == "cuda":
        lines.append(f"  start-up holds {fmt_bytes(plan.build_peak)} per GPU (the rank's weights in fp32, its own "
                     f"experts only, before DeepSpeed converts them)")
    lines.append(f"  at MFU {lay.mfu:g} of {lay.peak_tflops:g} TFLOP/s per GPU: {plan.tokens_per_s:,.0f} tokens/s; "
                 f"{plan.tokens:.3g} tokens in {fmt_time(plan.seconds)}")
    return "\n".join(lines)


def startup_line(cfg: Config, world_size: int, device) -> str:
    """The plan line `moe train` prints on rank 0: on a GPU checked against the card's memory; on a CPU
    the host-memory estimate per process only."""
    if getattr(device, "type", str(device)) == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
        layout = Layout(nodes=1, gpus_per_node=world_size, memory=memory, device="cuda")
    else:
        layout = Layout(nodes=1, gpus_per_node=world_size, device="cpu")
    return one_line(estimate(cfg, layout, advise=False))


def table_cell(plan: Plan) -> str:
    """The verdict in a few words (the presets table of the README)."""
    if plan.fits:
        return f"fits, {plan.total / GIB:.1f} GiB"
    if plan.total <= plan.layout.memory:
        return f"no: start-up {plan.build_peak / GIB:.1f} GiB"
    return f"no: {plan.total / GIB:.1f} GiB, largest {plan.largest}"


def one_line(plan: Plan) -> str:
    """The short line `moe train` and `moe launch` print."""
    terms = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in plan.memory.items())
    return f"[moe plan] {verdict(plan)} ({terms})"



__all__ = ["Layout", "Plan", "estimate", "parse_memory", "report", "one_line", "verdict", "state_bytes",
           "activation_bytes_per_token", "memory_terms", "resolve_vocab", "fmt_bytes", "GB", "GIB"]
