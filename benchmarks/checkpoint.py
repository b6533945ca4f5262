"""What checking a checkpoint costs: `moe ckpt verify` (and the verification every resume runs first)
against simply reading the folder's bytes once, on the quickstart MoE checkpoint and on a ~1 GB one.

    python -m benchmarks.checkpoint [--sizes quickstart,1gb] [--reps 3] [--keep DIR] [--json OUT]

Each size trains one step of an MoE model with `moe train` (the real save path: checkpoint files,
manifest, fsync) into a scratch folder, then times, alternating so machine noise hits each alike:
`read` (every file read once, the floor of any check), `checksums` (SHA-256 of every file against
manifest.json), `verify` (checksums, headers and expert bookkeeping, every tensor finite, one step
everywhere: what `moe ckpt verify` and resuming run). Reports medians and verify/read.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SIZES = {
    # the quickstart MoE model as trained by `make quickstart`
    "quickstart": ["experiments/quickstart_moe.yaml"],
    # d_model 768, 4 blocks of 8 experts of hidden 1024: ~85M parameters, ~1 GB of weights and moments
    "1gb": ["experiments/quickstart_moe.yaml", "model.d_model=768", "model.n_heads=12", "model.n_layers=4",
            "model.moe.expert_hidden=1024", "model.ffn_hidden=2048"],
}


def write_checkpoint(name: str, root: str) -> str:
    cfg, *overrides = SIZES[name]
    cmd = [sys.executable, "-m", "moe.cli", "train", cfg, *overrides, f"run.root={root}", f"run.name={name}",
           "train.steps=1", "train.seq_len=32", "train.micro_batch_size=1", "train.eval_batches=1",
           "train.warmup_steps=0", "data.max_bytes=200000", "logging.progress=false", "logging.wandb.mode=disabled"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, WANDB_MODE="disabled"))
    return os.path.join(root, name, "checkpoints", "step_00000001")


def read_all(path: str) -> None:
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            while f.read(8 << 20):
                pass


def main(argv=None) -> dict:
    from moe.train.checkpoint.manifest import check_manifest
    from moe.train.checkpoint.integrity import verify

    p = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="quickstart,1gb")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--keep", metavar="DIR", help="write the checkpoints here (default: a temporary folder)")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    root = args.keep or tempfile.mkdtemp(prefix="moe-ckpt-bench-")
    checks = {"read": read_all, "checksums": lambda path: check_manifest(path, 2), "verify": verify}
    rows = []
    for name in args.sizes.split(","):
        path = write_checkpoint(name, root)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        assert verify(path) == [], path
        times = {k: [] for k in checks}
        for _ in range(args.reps):
            for k, fn in checks.items():
                t0 = time.perf_counter()
                fn(path)
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"size": name, "bytes": size, **{f"{k}_s": v for k, v in med.items()},
                     "verify_over_read": med["verify"] / med["read"], "verify_gb_per_s": size / med["verify"] / 1e9})
    print("| checkpoint | size | read | checksums | verify | verify / read | verify GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} | {r['bytes'] / 1e6:,.1f} MB | {r['read_s']:.3f} s | {r['checksums_s']:.3f} s | "
              f"{r['verify_s']:.3f} s | {r['verify_over_read']:.2f} | {r['verify_gb_per_s']:.2f} |")
    result = {"rows": rows, "reps": args.reps, "cpu_count": os.cpu_count()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
