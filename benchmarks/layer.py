"""MoE layer benchmark: forward + backward of one FFN layer, fp32 on CPU, all in the same run.

    python -m benchmarks.layer [--shape E:k:h ...] [--d-model D] [--tokens 2048 8192] [--reps N] [--threads N]
                               [--zero-grad] [--system-alloc] [--json OUT]

Compared at every --shape E:k:h (E experts of hidden h, top-k; default 8:2:1024, 64:8:256 and 128:8:128,
coarse to fine-grained) and every T in --tokens, with d = --d-model (512):

- dense:            a SwiGLU FFN of hidden k * h: the same active FLOPs per token;
- dense, our kernels: the same FFN computed by the MoE layer's compiled expert op as one expert over every
                    token (when the extension is built): the same GEMM and SwiGLU kernels as `ours`. On
                    CPU the extension's fp32 GEMM is its own, not ATen's (MKL), and can be faster than
                    it, so "x our dense" (ours over this row) is the MoE layer's own overhead with no
                    difference of GEMM libraries in it: the stricter of the two ratios when it is larger;
- ours dropless:    moe.nn.moe_layer.MoELayer, top-2 softmax router, no capacity (the training default);
- ours cf=1.0:      the same with capacity factor 1.0 (tokens over capacity dropped);
- ours + _grouped_mm: ours dropless with the experts as torch._grouped_mm (model.moe.experts_impl=grouped,
                    what torchtitan uses) instead of our compiled grouped SwiGLU;
- deepspeed:        deepspeed.moe.layer.MoE, the same SwiGLU experts, drop_tokens=False (dropless)
                    and capacity factor 1.0 with drop_tokens=True;
- hf-mixtral:       transformers' MixtralSparseMoeBlock (per-expert Python loop), when installed.

Each measurement is the median of --reps timed forward+backward passes (backward of a fixed random
gradient of the output) after warmup; implementations take turns inside every round so machine noise
hits all alike. "x dense" is the median over rounds of the time over dense's time in the same round,
with its quartiles (p25-p75) to show the noise left; "x our dense" the same against `dense, our kernels`.
By default the parameter gradients accumulate from pass to pass (each backward adds into .grad, as
under gradient accumulation; the MoE layers have E/k times the parameters of dense, and on the 2-core
dev VM that add cost them ~10% of a T=1024 pass at 8:2:1024); --zero-grad sets them to None before each pass (untimed), as a training
step's `zero_grad(set_to_none=True)` does, so each backward writes fresh gradients.
Freed memory is kept in the process for reuse (moe.train.host_memory.keep_freed_memory, as `moe train` does
by default), for every implementation alike; --system-alloc keeps glibc's default, under which every
block over 32 MiB (the MoE layers' weight gradients) is page-faulted in anew on every pass.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch import nn

from benchmarks import quartiles

DEFAULT_SHAPES = ("8:2:1024", "64:8:256", "128:8:128")


def parse_shape(text: str) -> tuple[int, int, int]:
    """"E:k:h" -> (E, k, h), checked: 1 <= k <= E, h >= 1."""
    try:
        experts, top_k, hidden = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape wants E:k:h (e.g. 64:8:256), got {text!r}") from None
    if not (1 <= top_k <= experts and hidden >= 1):
        raise argparse.ArgumentTypeError(f"--shape {text}: needs 1 <= k <= E and h >= 1")
    return experts, top_k, hidden


class SwiGLU(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(d, 2 * h, bias=False)
        self.w2 = nn.Linear(h, d, bias=False)

    def forward(self, x):
        g, u = self.w13(x).chunk(2, dim=-1)
        return self.w2(nn.functional.silu(g) * u)


class DenseThroughExpertOp(nn.Module):
    """A dense SwiGLU FFN computed by the compiled expert op (`moe.ops.grouped_swiglu`) as one expert over
    every token: the dense limit with the MoE layer's own kernels."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.w13 = nn.Parameter(torch.randn(2 * h, d) * 0.02)
        self.w2 = nn.Parameter(torch.randn(d, h) * 0.02)

    def forward(self, x):
        from moe import ops

        rows = x.reshape(-1, x.shape[-1])
        counts = torch.tensor([rows.shape[0]])
        return ops.grouped_swiglu(rows, self.w13.unsqueeze(0), self.w2.unsqueeze(0), counts).view_as(x)


OUR_DENSE = "dense, our kernels"


def build_impls(d_model: int, experts: int, top_k: int, hidden: int):
    from moe import ops
    from moe.config import load_config
    from moe.nn.ffn import DenseFFN
    from moe.nn.moe_layer import MoELayer

    impls = {}
    impls["dense"] = DenseFFN(d_model, top_k * hidden, 0.02, 0.02)
    if ops.grouped_swiglu_supported("auto", torch.empty(0)):
        impls[OUR_DENSE] = DenseThroughExpertOp(d_model, top_k * hidden)
    variants = [("ours dropless", 0.0, "auto"), ("ours cf=1.0", 1.0, "auto")]
    if hasattr(torch, "_grouped_mm"):
        variants.append(("ours + _grouped_mm", 0.0, "grouped"))
    for name, cf, experts_impl in variants:
        cfg = load_config(None, ["model.vocab_size=16", f"model.moe.num_experts={experts}", f"model.moe.top_k={top_k}",
                                 f"model.moe.expert_hidden={hidden}", f"model.moe.capacity_factor={cf}",
                                 f"model.moe.experts_impl={experts_impl}"]).model.moe
        impls[name] = MoELayer(d_model, hidden, cfg, 0.02, 0.02)
    try:
        impls.update(_deepspeed_layers(d_model, experts, top_k, hidden))
    except Exception as exc:  # report, do not hide, why a peer is missing
        print(f"deepspeed MoE unavailable: {type(exc).__name__}: {exc}")
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=d_model, intermediate_size=hidden, num_local_experts=experts,
                            num_experts_per_tok=top_k)
        impls["hf-mixtral"] = MixtralSparseMoeBlock(cfg)
    except Exception as exc:
        print(f"transformers Mixtral block unavailable ({type(exc).__name__}); pip install -e '.[bench]'")
    return impls


def _deepspeed_layers(d_model: int, experts: int, top_k: int, hidden: int):
    import deepspeed
    from deepspeed.moe.layer import MoE

    from moe.parallel import init_distributed

    init_distributed("gloo")
    out = {}
    for name, cf, drop in (("deepspeed dropless", 1.0, False), ("deepspeed cf=1.0", 1.0, True)):
        out[name] = MoE(hidden_size=d_model, expert=SwiGLU(d_model, hidden), num_experts=experts, ep_size=1, k=top_k,
                        capacity_factor=cf, eval_capacity_factor=cf, min_capacity=4, drop_tokens=drop)
    del deepspeed
    return out


def run_once(module, x, grad_out):
    out = module(x)
    if isinstance(out, tuple):
        out = out[0]
    out.backward(grad_out)


def _measure(args, experts: int, top_k: int, hidden: int, T: int, reused: bool) -> dict:
    """One shape at one T: every implementation against dense, taking turns; prints the table, returns the rows."""
    impls = build_impls(args.d_model, experts, top_k, hidden)
    x = torch.randn(1, T, args.d_model, requires_grad=True)
    # a dense gradient, as a layer inside a network receives (not the stride-0 ones of .sum().backward())
    grad_out = torch.randn(1, T, args.d_model)
    times = {name: [] for name in impls}
    for mod in impls.values():  # warmup
        for _ in range(2):
            run_once(mod, x, grad_out)
    for _ in range(args.reps):
        for name, mod in impls.items():
            if args.zero_grad:
                for p_ in mod.parameters():
                    p_.grad = None
                x.grad = None
            t0 = time.perf_counter()
            run_once(mod, x, grad_out)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    # ratios within each round (every implementation ran once, back to back), then their median and
    # quartiles: slow drifts of the machine cancel, the spread shows what noise is left
    quart = {name: quartiles([t / d for t, d in zip(ts, times["dense"])]) for name, ts in times.items()}
    rows = {
        name: {"ms": 1e3 * med[name], "vs_dense": quart[name][1], "vs_dense_p25": quart[name][0],
               "vs_dense_p75": quart[name][2]} for name in impls}
    if OUR_DENSE in times:
        for name, ts in times.items():
            q = quartiles([t / d for t, d in zip(ts, times[OUR_DENSE])])
            rows[name].update(vs_our_dense=q[1], vs_our_dense_p25=q[0], vs_our_dense_p75=q[2])
    print(f"\nT={T}, d={args.d_model}, expert hidden {hidden}, E={experts}, k={top_k}; forward+backward, "
          f"median of {args.reps}, {torch.get_num_threads()} threads"
          f"{', gradients set to None before each pass' if args.zero_grad else ''}"
          f"{'' if reused else ', system allocator'}")
    ours = OUR_DENSE in times
    print(f"{'implementation':<22}{'ms':>10}{'x dense':>10}{'p25-p75':>14}" + (f"{'x our dense':>14}{'p25-p75':>14}" if ours else ""))
    for name, r in rows.items():
        print(f"{name:<22}{r['ms']:>10.2f}{r['vs_dense']:>10.2f}{r['vs_dense_p25']:>9.2f}-{r['vs_dense_p75']:.2f}"
              + (f"{r['vs_our_dense']:>14.2f}{r['vs_our_dense_p25']:>9.2f}-{r['vs_our_dense_p75']:.2f}" if ours else ""))
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.layer", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=parse_shape, nargs="+", default=[parse_shape(s) for s in DEFAULT_SHAPES],
                   metavar="E:k:h", help="E experts of hidden h, top-k (default: %s)" % " ".join(DEFAULT_SHAPES))
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--zero-grad", action="store_true",
                   help="set the gradients to None before every pass instead of accumulating into them")
    p.add_argument("--system-alloc", action="store_true",
                   help="keep glibc's default malloc (large blocks page-faulted in on every pass)")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from moe import ops
    from moe.train.host_memory import keep_freed_memory

    reused = not args.system_alloc and keep_freed_memory()

    results = {"d_model": args.d_model, "machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "zero_grad": args.zero_grad, "freed_memory_reused": reused, "torch": torch.__version__, "dispatch_backend": ops.dispatch_backend("auto"),
               "shapes": {}}
    for experts, top_k, hidden in args.shape:
        shape = f"{experts}:{top_k}:{hidden}"
        results["shapes"][shape] = {}
        for T in args.tokens:
            results["shapes"][shape][str(T)] = _measure(args, experts, top_k, hidden, T, reused)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main()
