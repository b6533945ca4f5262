"""Router families side by side: each trained for the same short budget on the embedded corpus.

    python -m benchmarks.routers [--steps N] [--json OUT] [--root DIR] [--only a,b] [--data-cache DIR]
                                 [key=value ...]

Runs `moe train experiments/routers/<family>.yaml` once per family, in turn, each in its own process
and run folder (<root>/<family>, replaced on every invocation), with W&B disabled, then prints one
table: final validation loss, expert load max/mean and dropped fraction (means over the MoE layers and
over the last quarter of the logged windows), and training tokens/s (eval excluded). Overrides
(key=value) apply to every family, e.g. `train.micro_batch_size=4`.

Load max/mean is computed on what each router chose, before capacity drops; for expert choice it is
what each expert kept (1.0 by construction). Dropped is the fraction of routed (token, expert) pairs
a capacity dropped; for expert choice the fraction of tokens no expert took.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "experiments", "routers")

# (family, what it is) in table order; each is experiments/routers/<family>.yaml
FAMILIES = [
    ("topk_nobal", "top-2 softmax, no balancing"),
    ("topk", "top-2 softmax + Switch aux loss"),
    ("mixtral", "top-2, softmax after top-k + aux loss"),
    ("topk_global", "top-2 + global-batch aux loss"),
    ("deepseek_v3", "sigmoid, 4 groups, aux-free bias + seq loss"),
    ("noisy_topk", "noisy top-2 gating + aux loss"),
    ("gshard", "top-2, random routing, capacity 2.0"),
    ("switch", "top-1, capacity 1.25, jitter + aux loss"),
    ("expert_choice", "expert choice, capacity 1.0 x top-2"),
    ("sinkhorn", "Sinkhorn-balanced top-2"),
    ("hash", "hash of the token id, top-2"),
]


def tail_mean(lines: List[dict], suffix: str, fraction: float = 0.25) -> Optional[float]:
    """Mean of router/layer*/<suffix> over the MoE layers and the last `fraction` of the windows."""
    rows = [line for line in lines if any(k.endswith("/" + suffix) for k in line)]
    if not rows:
        return None
    rows = rows[-max(1, int(round(len(rows) * fraction))):]
    values = [v for line in rows for k, v in line.items()
              if k.startswith("router/layer") and k.endswith("/" + suffix) and v is not None]
    return sum(values) / len(values) if values else None


def run_family(family: str, steps: int, root: str, data_cache: Optional[str], overrides: List[str]) -> Dict:
    run_dir = os.path.join(root, family)
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [sys.executable, "-m", "moe.cli", "train", os.path.join(CONFIG_DIR, f"{family}.yaml"),
            f"train.steps={steps}", f"run.root={root}", f"run.name={family}", "train.eval_every=0",
            "checkpoint.save_final=false", "logging.progress=false", *overrides]
    if data_cache:
        args.append(f"data.cache_dir={data_cache}")
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{family} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return {
        "family": family,
        "val_loss": summary.get("val_loss"),
        "train_loss": summary.get("train_loss"),
        "load_max_over_mean": tail_mean(lines, "max_over_mean"),
        "load_cv": tail_mean(lines, "cv"),
        "dropped_frac": tail_mean(lines, "dropped_frac"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "params_active": summary.get("params_active"),
        "steps": summary.get("steps"),
        "tokens": summary.get("tokens"),
        "wall_s": round(wall, 1),
    }


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: List[Dict]) -> str:
    what = dict(FAMILIES)
    out = ["| router | what | val loss | load max/mean | dropped | tokens/s |",
           "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['family']} | {what.get(r['family'], '')} | {_fmt(r['val_loss'], '.4f')} | "
                   f"{_fmt(r['load_max_over_mean'], '.3f')} | {_fmt(r['dropped_frac'], '.3f')} | "
                   f"{_fmt(r['tokens_per_s'], ',.0f')} |")
    return "\n".join(out)


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.routers", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per family (default 200)")
    p.add_argument("--json", metavar="OUT", help="also write the rows (and the command) as JSON")
    p.add_argument("--root", default="runs/bench_routers", help="parent of the run folders (relative to the repo)")
    p.add_argument("--only", default="", help="comma-separated families (default: all)")
    p.add_argument("--data-cache", default=None, help="data.cache_dir for every run")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every family")
    args = p.parse_args(argv)
    known = [f for f, _ in FAMILIES]
    families = [f for f in args.only.split(",") if f] or known
    unknown = [f for f in families if f not in known]
    if unknown:
        p.error(f"unknown families {unknown}; known: {', '.join(known)}")
    root = os.path.abspath(os.path.join(ROOT, args.root))
    rows = []
    for family in families:
        print(f"[routers] {family} ...", file=sys.stderr, flush=True)
        rows.append(run_family(family, args.steps, root, args.data_cache, args.overrides))
    text = table(rows)
    print(text)
    if args.json:
        command = "python -m benchmarks.routers " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.json, "w") as f:
            json.dump({"command": command.strip(), "steps": args.steps, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
