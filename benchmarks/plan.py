"""`moe plan` against measured memory: the plan's per-rank estimate vs each rank's peak resident memory.

    python -m benchmarks.plan [--json OUT] [--steps N] [--only NAME ...] [--baseline]

Runs real `moe train` processes on this machine (CPU, fp32, gloo; two ranks through torchrun for the
expert-parallel layouts) on small models large enough that the model terms dominate the process
baseline, and reads each rank's peak resident set size (`getrusage(RUSAGE_SELF).ru_maxrss`) when its
`moe train` returns: each rank runs `moe.cli.main` inside this module's `--worker` mode, which writes
that peak to a JSON file next to the run. The plan is `moe.train.plan.estimate` for the same config on
a `cpu` layout (host memory, with the measured process baseline `CPU_BASELINE` as its overhead term).

`--baseline` measures that baseline instead: the peak of the tiny debug model (whose model terms are a
few MB) at one and two ranks, minus its planned model terms.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["data.dataset=embedded:stdlib", "data.max_bytes=2000000", "train.seq_len=256", "model.max_seq_len=256",
          "train.eval_every=0", "train.eval_batches=1", "train.log_every=1", "train.warmup_steps=1",
          "checkpoint.save_final=false", "logging.wandb.mode=disabled", "logging.progress=false",
          "model.vocab_size=257"]
MODEL_A = ["model.d_model=512", "model.n_layers=4", "model.n_heads=8", "model.moe.num_experts=8",
           "model.moe.top_k=2", "model.moe.expert_hidden=1024"]
MODEL_B = ["model.d_model=768", "model.n_layers=4", "model.n_heads=12", "model.moe.num_experts=16",
           "model.moe.top_k=2", "model.moe.expert_hidden=768"]
MODEL_C = ["model.d_model=512", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=2", "model.qk_norm=head",
           "model.moe.num_experts=32", "model.moe.top_k=4", "model.moe.expert_hidden=256"]
# name -> (processes, overrides): ep 1/2, zero 0/2, micro-batch 4/8
CASES = {
    "A ep1 zero0 mbs4": (1, MODEL_A + ["parallel.ep_size=1", "train.zero_stage=0", "train.micro_batch_size=4"]),
    "A ep1 zero2 mbs8": (1, MODEL_A + ["parallel.ep_size=1", "train.zero_stage=2", "train.micro_batch_size=8"]),
    "B ep2 zero0 mbs8": (2, MODEL_B + ["parallel.ep_size=2", "train.zero_stage=0", "train.micro_batch_size=8"]),
    "B ep2 zero2 mbs4": (2, MODEL_B + ["parallel.ep_size=2", "train.zero_stage=2", "train.micro_batch_size=4"]),
    "C ep1 zero2 mbs4": (1, MODEL_C + ["parallel.ep_size=1", "train.zero_stage=2", "train.micro_batch_size=4"]),
    "C ep2 zero0 mbs8": (2, MODEL_C + ["parallel.ep_size=2", "train.zero_stage=0", "train.micro_batch_size=8"]),
}
BASELINE_CASES = {"debug 1 rank": (1, []), "debug 2 ranks": (2, [])}


def worker(out_prefix: str, argv) -> None:
    """One rank: `moe train ...`, then its peak RSS into OUT_PREFIX.rank<R>.json."""
    from moe.cli import main

    try:
        main(argv)
    finally:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        rank = os.environ.get("RANK", "0")
        with open(f"{out_prefix}.rank{rank}.json", "w") as f:
            json.dump({"rank": int(rank), "peak_rss": peak}, f)


def run_case(name: str, nproc: int, overrides, steps: int, work: str, config: str) -> list:
    prefix = os.path.join(work, name.replace(" ", "_"))
    args = ["train", config, *COMMON, *overrides, f"train.steps={steps}", f"run.root={work}",
            f"run.name={os.path.basename(prefix)}", f"data.cache_dir={os.path.join(work, 'data_cache')}",
            "train.threads=1"]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc-per-node={nproc}"]
    cmd = launcher + ["-m", "benchmarks.plan", "--worker", prefix, "--", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, WANDB_MODE="disabled")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: moe train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peaks = [json.load(open(p))["peak_rss"] for p in sorted(glob.glob(prefix + ".rank*.json"))]
    return peaks, time.perf_counter() - t0, args


def planned(args, nproc: int, overhead: bool = True) -> dict:
    from moe.config import load_config
    from moe.train.plan import Layout, estimate

    cfg = load_config(args[1], [a for a in args[2:] if "=" in a])
    plan = estimate(cfg, Layout(nodes=1, gpus_per_node=nproc, device="cpu"))
    memory = dict(plan.memory)
    if not overhead:
        memory.pop("overhead")
    return {"total": sum(memory.values()), "memory": memory}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1], argv[3:] if argv[2] == "--" else argv[2:])
        return {}
    p = argparse.ArgumentParser(prog="python -m benchmarks.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--only", nargs="*", default=None, help="case names (default: all)")
    p.add_argument("--baseline", action="store_true", help="measure the process baseline instead")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    cases = BASELINE_CASES if args.baseline else CASES
    config = os.path.join(ROOT, "experiments", "debug_moe.yaml")
    rows = []
    with tempfile.TemporaryDirectory(prefix="moe-plan-bench-") as work:
        # the token cache is built here first: every measured process reads it, as a run on a cached or
        # prepared corpus does (a process that tokenizes also imports megatron-core's writer, ~60 MiB)
        from moe.config import load_config
        from moe.data import prepare_data

        prepare_data(load_config(config, [*COMMON, f"data.cache_dir={os.path.join(work, 'data_cache')}"]).data)
        for name, (nproc, overrides) in cases.items():
            if args.only and name not in args.only:
                continue
            peaks, wall, run_args = run_case(name, nproc, overrides, args.steps, work, config)
            plan = planned(run_args, nproc, overhead=not args.baseline)
            rows.append({"case": name, "ranks": nproc, "overrides": overrides, "peak_rss": peaks,
                         "planned": plan["total"], "terms": plan["memory"], "wall_s": wall,
                         "error": [plan["total"] / peak - 1 for peak in peaks]})
            print(_row(rows[-1], args.baseline), flush=True)
    result = {"steps": args.steps, "baseline": args.baseline, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _row(r: dict, baseline: bool) -> str:
    mib = 2 ** 20
    peaks = " / ".join(f"{p / mib:,.0f}" for p in r["peak_rss"])
    if baseline:
        base = " / ".join(f"{(p - r['planned']) / mib:,.0f}" for p in r["peak_rss"])
        return f"| {r['case']} | {peaks} | {r['planned'] / mib:,.1f} | {base} |"
    terms = ", ".join(f"{k} {v / mib:,.0f}" for k, v in r["terms"].items())
    errors = " / ".join(f"{100 * e:+.1f}%" for e in r["error"])
    return f"| {r['case']} | {terms} | {r['planned'] / mib:,.0f} | {peaks} | {errors} |"


if __name__ == "__main__":
    main()
