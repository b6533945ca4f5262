"""Peak memory and step time by activation recompute (none / moe / full) and expert-parallel size, and the
build path before meta-device construction, side by side.

    python -m benchmarks.memory [--nproc N] [--cases NAME ...] [--steps N] [--json OUT] [key=value ...]
    moe bench memory [...]

Every case runs as N processes on this machine (torchrun --standalone, gloo on CPU, NCCL on GPUs) with
the same world size and global batch. Each rank builds the model as `moe train` does (on `meta`, then
`parallel.build_engine`: expert parallelism, this rank's weights materialised and initialised,
recompute, DeepSpeed), or, for the `old build` case, as it was built before: the whole model
initialised on the device from the seed, then sliced to the rank's experts (`GPT(cfg).to(device)`).
It then times training steps (forward, backward, AdamW step; median of the slowest rank) on fixed
random token batches, with the host-memory policy of training (train.keep_freed_memory).

Memory per rank: on the CPU the peak resident set (`ru_maxrss`), and its growth over the process
before the model is built (`model peak`: Python, torch with torch._dynamo, which its optimizer
imports, DeepSpeed and gloo excluded), under the run's host-memory policy (train.keep_freed_memory:
true keeps freed blocks, holes included; false returns them, so the resident set follows the live
tensors; moe/train/host_memory.py); on a GPU the
peak allocated bytes (`torch.cuda.max_memory_allocated`). `expected` is what the rank should hold at
its peak: its non-expert weights, its 1/ep of the experts, their gradients and AdamW moments (fp32:
16 bytes a parameter), plus `moe plan`'s activation term for the mode (moe/train/plan.py). The table
shows the largest rank of each case; `a2a ms` is the token exchange's time per step (all-to-alls,
forward, backward and a recompute's, as `ep/exchange_s` reports it).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

MODEL = ["model.d_model=512", "model.n_layers=4", "model.n_heads=8", "model.moe.num_experts=64",
         "model.moe.top_k=2", "model.moe.expert_hidden=128", "model.vocab_size=257", "model.max_seq_len=256",
         "train.seq_len=256", "train.dtype=fp32", "model.moe.aux_loss_coef=0.01", "model.moe.z_loss_coef=0.001"]
CASES = ["ep=4,old", "ep=1", "ep=2", "ep=4", "ep=4,recompute=moe", "ep=4,recompute=full"]
"""The default cases: `ep=P` (parallel.ep_size), `recompute=MODE` (train.recompute, default none), `old`
(the build path before meta-device construction)."""


def parse_case(spec: str) -> tuple:
    """(ep_size, recompute, old build) of a case spec such as `ep=4,recompute=full` or `ep=4,old`."""
    ep, recompute, old = 1, "none", False
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key == "ep" and value.isdigit():
            ep = int(value)
        elif key == "recompute" and value in ("none", "moe", "full"):
            recompute = value
        elif part == "old":
            old = True
        else:
            raise SystemExit(f"error: --cases {spec!r}: {part!r} is not ep=N, recompute=none|moe|full or old")
    return ep, recompute, old


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(cfg, info, old_build: bool):
    import torch

    from moe import parallel
    from moe.config import grad_accum_steps
    from moe.nn.gpt import GPT

    if old_build:  # before meta-device construction: everything initialised, then sliced
        torch.manual_seed(cfg.run.seed)
        model = GPT(cfg.model).to(info.device)
    else:
        with torch.device("meta"):
            model = GPT(cfg.model)
    accum = grad_accum_steps(cfg, info.world_size)
    engine, _, _, dtype = parallel.build_engine(model, cfg, info, accum)
    return model, engine, dtype, accum


def worker(config: str, overrides, steps: int, warmup: int, out: str, old_build: bool) -> None:
    import torch
    import torch.distributed as dist

    from moe import parallel
    from moe.config import load_config
    from moe.parallel import ep_metrics
    from moe.routing.balancing import end_optimizer_step
    from moe.train.host_memory import keep_freed_memory, return_freed_memory
    from moe.validate import validate

    cfg = load_config(config, list(overrides) + ["logging.wandb.mode=disabled"])
    world = parallel.world_size_from_env()
    validate(cfg, world)
    torch.set_num_threads(cfg.train.threads or 1)
    if cfg.train.keep_freed_memory:
        keep_freed_memory()
    else:
        return_freed_memory()
    info = parallel.init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    import torch._dynamo  # noqa: F401  code every training process loads (torch's optimizer imports it), not model memory

    base = rss_bytes()
    t0 = time.perf_counter()
    model, engine, dtype, accum = build(cfg, info, old_build)
    build_s = time.perf_counter() - t0
    built_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    B, S, V = cfg.train.micro_batch_size, cfg.train.seq_len, cfg.model.vocab_size
    batch = torch.randint(0, V, (accum * world * B, S + 1), generator=torch.Generator().manual_seed(0))
    engine.train()
    times = []
    for i in range(warmup + steps):
        if i == warmup:
            ep_metrics(model, 1, 1.0)  # reset the exchange counters after warm-up
        dist.barrier()
        t = time.perf_counter()
        for m in range(accum):
            rows = batch[(m * world + info.rank) * B:(m * world + info.rank + 1) * B].to(info.device)
            with torch.autocast(info.device.type, dtype=dtype, enabled=dtype != torch.float32):
                o = engine(rows[:, :-1], rows[:, 1:])
            engine.backward(o.loss + o.aux_loss)
            engine.step()
        end_optimizer_step(model)
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    exchange_s = ep_metrics(model, steps, sum(times)).get("ep/exchange_s", 0.0)  # a collective: every rank
    mine = {"rank": info.rank, "base_rss": base, "built_peak_rss": built_peak, "build_s": build_s,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "params": sum(p.numel() for p in model.parameters()),
            "gpu_peak": torch.cuda.max_memory_allocated() if info.device.type == "cuda" else None}
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    if info.rank == 0:
        with open(out, "w") as f:
            json.dump({"step_s": statistics.median(times), "exchange_s": exchange_s, "ranks": ranks, "device": str(info.device),
                       "grad_accum": accum}, f)
    parallel.shutdown_distributed()


def planned(config: str, overrides, nproc: int) -> dict:
    """`moe plan`'s terms (bytes per rank) for a case on `nproc` CPU ranks: activations, and the sum
    of weights, gradients, optimizer, activations and buffers (its overhead term excluded)."""
    from moe.config import load_config
    from moe.train.plan import Layout, estimate

    cfg = load_config(config, list(overrides))
    memory = estimate(cfg, Layout(nodes=1, gpus_per_node=nproc, device="cpu"), advise=False).memory
    return {"activations": memory["activations"], "model_terms": sum(v for k, v in memory.items() if k != "overhead")}


def run_case(config: str, overrides, nproc: int, steps: int, warmup: int, old_build: bool, tmp: str) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = os.path.join(tmp, f"case{len(os.listdir(tmp))}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "benchmarks.memory", "worker", config, *overrides, "--steps", str(steps), "--warmup", str(warmup),
           "--out", out] + (["--old-build"] if old_build else [])
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=repo)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(out):
        sys.exit(f"{' '.join(overrides[-2:])} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    with open(out) as f:
        return json.load(f)


def summarise(name: str, r: dict, plan: dict) -> dict:
    top = max(r["ranks"], key=lambda x: x["gpu_peak"] or x["peak_rss"])
    peak = top["gpu_peak"] if top["gpu_peak"] is not None else top["peak_rss"]
    model_peak = peak if top["gpu_peak"] is not None else peak - top["base_rss"]
    expected = 16 * top["params"] + plan["activations"]  # fp32 weights, gradients, two AdamW moments
    build_peak = top["built_peak_rss"] - top["base_rss"]  # the model and engine built, before the first step
    return {"case": name, "step_s": r["step_s"], "exchange_s": r["exchange_s"], "peak": peak, "model_peak": model_peak, "expected": expected,
            "build_peak": build_peak,
            "plan_model_terms": plan["model_terms"], "plan_activations": plan["activations"],
            "params_per_rank": top["params"], "build_s": top["build_s"], "device": r["device"], "ranks": r["ranks"]}


def print_table(rows, nproc: int, tokens: int) -> None:
    mib = 2 ** 20
    cases = [parse_case(r["case"]) for r in rows]
    none = {c[0]: r["step_s"] for c, r in zip(cases, rows) if c[1:] == ("none", False)}
    old = {c[0]: r for c, r in zip(cases, rows) if c[2]}
    print(f"memory: {nproc} processes, {tokens} tokens/step, device {rows[0]['device']}; the largest rank of each "
          f"case; x none: step time over the same ep without recompute; old /: the old build's figure at the "
          f"same ep over the case's (build: after building, before the first step; model: the whole run)")
    print(f"{'case':<20}{'params/rank':>12}{'step ms':>9}{'x none':>7}{'a2a ms':>8}{'build MiB':>10}{'old /':>7}{'peak MiB':>10}"
          f"{'model MiB':>11}{'old /':>7}{'expected':>10}{'/exp':>7}{'plan MiB':>10}")
    for (ep, _, _), r in zip(cases, rows):
        ratio = f"{r['step_s'] / none[ep]:.2f}" if ep in none else "-"
        old_build = f"{old[ep]['build_peak'] / r['build_peak']:.2f}" if ep in old else "-"
        old_peak = f"{old[ep]['model_peak'] / r['model_peak']:.2f}" if ep in old else "-"
        print(f"{r['case']:<20}{r['params_per_rank']:>12,}{1e3 * r['step_s']:>9.0f}{ratio:>7}{1e3 * r['exchange_s']:>8.0f}"
              f"{r['build_peak'] / mib:>10.0f}{old_build:>7}{r['peak'] / mib:>10.0f}{r['model_peak'] / mib:>11.0f}"
              f"{old_peak:>7}{r['expected'] / mib:>10.0f}{r['model_peak'] / r['expected']:>7.2f}"
              f"{r['plan_model_terms'] / mib:>10.0f}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="experiments/debug_moe.yaml")
    p.add_argument("--nproc", type=int, default=4, help="processes (world size) of every case")
    p.add_argument("--cases", nargs="+", default=CASES, help="case specs (CASES)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per rank per micro-batch")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("overrides", nargs="*", help="config overrides after the benchmark's model (MODEL)")
    args = p.parse_args(argv)
    common = MODEL + [f"train.micro_batch_size={args.micro_batch}",
                      f"train.global_batch_size={args.micro_batch * args.nproc}", *args.overrides]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            ep, recompute, old_build = parse_case(name)
            overrides = common + [f"parallel.ep_size={ep}", f"train.recompute={recompute}"]
            result = run_case(args.config, overrides, args.nproc, args.steps, args.warmup, old_build, tmp)
            rows.append(summarise(name, result, planned(args.config, overrides, args.nproc)))
            print(f"[memory] {name}: {1e3 * result['step_s']:.0f} ms/step", flush=True)
    tokens = args.micro_batch * args.nproc * int(next(o for o in MODEL if o.startswith("train.seq_len")).split("=")[1])
    print_table(rows, args.nproc, tokens)
    result = {"config": args.config, "overrides": common, "nproc": args.nproc, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _worker_main(argv) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory worker")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--old-build", action="store_true")
    a = p.parse_args(argv)
    worker(a.config, a.overrides, a.steps, a.warmup, a.out, a.old_build)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        _worker_main(sys.argv[2:])
    else:
        main()
