"""MoE layer benchmark: forward + backward of one FFN layer, fp32 on CPU, all in the same run.

    python -m benchmarks.layer [--tokens 1024 4096] [--reps N] [--threads N] [--zero-grad] [--system-alloc]
                               [--json OUT]

Compared at (T tokens, d=512, expert hidden 1024, E=8, k=2):

- dense:            a SwiGLU FFN of hidden k * 1024 = 2048: the same active FLOPs per token;
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
with its quartiles (p25-p75) to show the noise left.
By default the parameter gradients accumulate from pass to pass (each backward adds into .grad, as
under gradient accumulation; the MoE layers have 4x the parameters of dense, and on the 2-core dev
VM that add cost them ~10% of a T=1024 pass); --zero-grad sets them to None before each pass (untimed), as a training
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

D_MODEL, HIDDEN, EXPERTS, TOP_K = 512, 1024, 8, 2


class SwiGLU(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(d, 2 * h, bias=False)
        self.w2 = nn.Linear(h, d, bias=False)

    def forward(self, x):
        g, u = self.w13(x).chunk(2, dim=-1)
        return self.w2(nn.functional.silu(g) * u)


def build_impls(tokens: int):
    from moe.config import load_config
    from moe.nn.ffn import DenseFFN
    from moe.nn.moe_layer import MoELayer

    impls = {}
    impls["dense"] = DenseFFN(D_MODEL, TOP_K * HIDDEN, 0.02, 0.02)
    variants = [("ours dropless", 0.0, "auto"), ("ours cf=1.0", 1.0, "auto")]
    if hasattr(torch, "_grouped_mm"):
        variants.append(("ours + _grouped_mm", 0.0, "grouped"))
    for name, cf, experts_impl in variants:
        cfg = load_config(None, ["model.vocab_size=16", f"model.moe.num_experts={EXPERTS}", f"model.moe.top_k={TOP_K}",
                                 f"model.moe.expert_hidden={HIDDEN}", f"model.moe.capacity_factor={cf}",
                                 f"model.moe.experts_impl={experts_impl}"]).model.moe
        impls[name] = MoELayer(D_MODEL, HIDDEN, cfg, 0.02, 0.02)
    try:
        impls.update(_deepspeed_layers())
    except Exception as exc:  # report, do not hide, why a peer is missing
        print(f"deepspeed MoE unavailable: {type(exc).__name__}: {exc}")
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=D_MODEL, intermediate_size=HIDDEN, num_local_experts=EXPERTS,
                            num_experts_per_tok=TOP_K)
        impls["hf-mixtral"] = MixtralSparseMoeBlock(cfg)
    except Exception as exc:
        print(f"transformers Mixtral block unavailable ({type(exc).__name__}); pip install -e '.[bench]'")
    return impls


def _deepspeed_layers():
    import deepspeed
    from deepspeed.moe.layer import MoE

    from moe.parallel import init_distributed

    init_distributed("gloo")
    out = {}
    for name, cf, drop in (("deepspeed dropless", 1.0, False), ("deepspeed cf=1.0", 1.0, True)):
        out[name] = MoE(hidden_size=D_MODEL, expert=SwiGLU(D_MODEL, HIDDEN), num_experts=EXPERTS, ep_size=1, k=TOP_K,
                        capacity_factor=cf, eval_capacity_factor=cf, min_capacity=4, drop_tokens=drop)
    del deepspeed
    return out


def run_once(module, x, grad_out):
    out = module(x)
    if isinstance(out, tuple):
        out = out[0]
    out.backward(grad_out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.layer", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
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

    results = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "zero_grad": args.zero_grad, "freed_memory_reused": reused, "torch": torch.__version__, "dispatch_backend": ops.dispatch_backend("auto"),
               "shapes": {}}
    for T in args.tokens:
        impls = build_impls(T)
        x = torch.randn(1, T, D_MODEL, requires_grad=True)
        # a dense gradient, as a layer inside a network receives (not the stride-0 ones of .sum().backward())
        grad_out = torch.randn(1, T, D_MODEL)
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
        results["shapes"][str(T)] = {
            name: {"ms": 1e3 * med[name], "vs_dense": quart[name][1], "vs_dense_p25": quart[name][0],
                   "vs_dense_p75": quart[name][2]} for name in impls}
        print(f"\nT={T}, d={D_MODEL}, expert hidden {HIDDEN}, E={EXPERTS}, k={TOP_K}; forward+backward, "
              f"median of {args.reps}, {torch.get_num_threads()} threads"
              f"{', gradients set to None before each pass' if args.zero_grad else ''}"
              f"{'' if reused else ', system allocator'}")
        print(f"{'implementation':<22}{'ms':>10}{'x dense':>10}{'p25-p75':>14}")
        for name, r in results["shapes"][str(T)].items():
            print(f"{name:<22}{r['ms']:>10.2f}{r['vs_dense']:>10.2f}"
                  f"{r['vs_dense_p25']:>9.2f}-{r['vs_dense_p75']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main()
