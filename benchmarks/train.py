"""Training-step throughput: the MoE model against the dense model with equal active parameters.

    python -m benchmarks.train [--dense CFG] [--moe CFG] [--steps N] [--threads N] [--system-alloc] [--json OUT]
                               [key=value ...]

Builds both models from their experiment configs (default: the quickstart pair), each in its
DeepSpeed engine as `moe train` builds it (moe/parallel/engine.py `build_engine`: AdamW, clipping, the LR
schedule), then times full training steps through `moe/train/step.py` `optimizer_step`, the step
`moe train` runs (forward, backward, gradient norm, engine step, router updates), on the same random
token batches, alternating dense and MoE step by step so machine noise hits both alike. Reports tokens/s of each and the ratio.
Overrides (key=value) apply to both configs, e.g. `train.micro_batch_size=16`; `train.compile=true`
times both models torch.compile-d (moe/parallel/engine.py `apply_compile`). Freed memory is kept
for reuse as `moe train` does (train.keep_freed_memory); --system-alloc keeps glibc's default.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from benchmarks import quartiles


def build(cfg_path: str, overrides, dist_info):
    from moe import parallel
    from moe.config import load_config
    from moe.validate import validate
    from moe.nn.accounting import count_params
    from moe.nn.gpt import GPT

    cfg = load_config(cfg_path, list(overrides))
    validate(cfg)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 257 if cfg.data.tokenizer == "bytes" else cfg.data.bpe_vocab_size
    model = GPT(cfg.model).to(dist_info.device)
    engine, _, _, dtype = parallel.build_engine(model, cfg, dist_info, grad_accum=1)  # compiles if train.compile
    return cfg, (engine, model, dtype), count_params(model)


def step(runner, device, x, y) -> None:
    from moe.train.step import optimizer_step

    engine, model, dtype = runner
    optimizer_step(engine, model, lambda: (x, y), 1, device, dtype)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--dense", default="experiments/quickstart_dense.yaml")
    p.add_argument("--moe", default="experiments/quickstart_moe.yaml")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--system-alloc", action="store_true", help="keep glibc's default malloc")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from moe.train.host_memory import keep_freed_memory

    reused = not args.system_alloc and keep_freed_memory()
    from moe import parallel

    dist_info = parallel.init_distributed("auto", 600)  # one process: DeepSpeed wants a process group
    torch.manual_seed(0)
    runs = {"dense": build(args.dense, args.overrides, dist_info), "moe": build(args.moe, args.overrides, dist_info)}
    cfg = runs["dense"][0]
    B, S, V = cfg.train.micro_batch_size, cfg.train.seq_len, cfg.model.vocab_size
    batches = [torch.randint(0, V, (B, S + 1)) for _ in range(4)]
    times = {k: [] for k in runs}
    for i in range(args.steps + 3):
        batch = batches[i % len(batches)]
        for name, (_, runner, _) in runs.items():
            t0 = time.perf_counter()
            step(runner, dist_info.device, batch[:, :-1], batch[:, 1:])
            if i >= 3:  # warmup
                times[name].append(time.perf_counter() - t0)
    tokens = B * S
    result = {"tokens_per_step": tokens, "threads": torch.get_num_threads(), "steps": args.steps,
              "freed_memory_reused": reused, "compiled": bool(cfg.train.compile)}
    for name, (_, _, params) in runs.items():
        med = statistics.median(times[name])
        result[name] = {"config": getattr(args, name), "tokens_per_s": tokens / med, "step_ms": 1e3 * med, **params}
    result["moe_over_dense"] = result["moe"]["tokens_per_s"] / result["dense"]["tokens_per_s"]
    # the same ratio step by step (each MoE step against the dense step right before it): its quartiles
    # show the noise left in the median
    p25, _, p75 = quartiles([d / m for d, m in zip(times["dense"], times["moe"])])
    result["moe_over_dense_p25"], result["moe_over_dense_p75"] = p25, p75
    print(f"training step, {tokens} tokens/step, median of {args.steps} alternating steps, "
          f"{torch.get_num_threads()} threads{', torch.compile' if cfg.train.compile else ', eager'}")
    print(f"{'model':<8}{'params active':>15}{'params total':>14}{'step ms':>10}{'tokens/s':>11}")
    for name in ("dense", "moe"):
        r = result[name]
        print(f"{name:<8}{r['params_active']:>15,}{r['params_total']:>14,}{r['step_ms']:>10.1f}{r['tokens_per_s']:>11,.0f}")
    print(f"MoE / dense tokens/s: {result['moe_over_dense']:.3f} "
          f"(per step: quartiles {result['moe_over_dense_p25']:.3f}-{result['moe_over_dense_p75']:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main()
