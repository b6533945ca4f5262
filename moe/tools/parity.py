"""`moe parity`: is a parallel layout the same model? Run a config at several layouts on the same
global batches and compare them step by step.

    moe parity experiments/debug_moe.yaml train.global_batch_size=8 \\
        --layouts "ep=1,nproc=1" "ep=2" "ep=4" "ep=2,zero=1" --steps 5 --nproc 4

A layout is comma-separated `key=value`: `ep` (parallel.ep_size), `nproc` (processes; default
--nproc), `zero` (train.zero_stage), `mbs` (train.micro_batch_size), `compile` (train.compile: the
compiled model against eager), or any dotted config key. Every
layout keeps the same global batch (train.global_batch_size; when the config leaves it 0, micro batch
x the largest nproc), so layouts with fewer processes accumulate gradients over more micro-batches.
Each layout runs as its own processes on this machine (torchrun --standalone) through the same
pieces as `moe train` (`parallel.build_engine`, which applies expert parallelism, and the DeepSpeed
engine), and reports per optimizer step, over the whole global batch: the loss, each auxiliary loss
(summed over MoE layers), the gradient norm before clipping, and each layer's per-expert token
counts. The first layout is the reference; the command prints every difference and exits 1 when one
exceeds --tolerance (relative; token counts: the largest count difference over the layer's total).

Which configs can match exactly: the per-micro-batch Switch aux loss depends on the micro-batch size
(keep `mbs` equal across layouts), and routing noise (noisy_gating, jitter_eps, random_routing) is
drawn per process, so a layout with another number of processes draws other noise. Expert
parallelism itself must change nothing: compare `ep=1` and `ep=N` at the same nproc and micro batch.

`--dump DIR` also keeps, per layout, the first step's logits over the global batch, every
parameter's gradient before the first step (ZeRO 0; expert gradients gathered to [E, ...]) and the
weights after the last step, as safetensors files with the EP=1 names (used by the tests).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from moe import parallel
from moe.config import ConfigError, global_batch_size, load_config
from moe.data import make_sampler
from moe.io import atomic_write
from moe.metrics import router_metrics, training_env
from moe.parallel import gather_experts, is_expert_param, model_groups
from moe.train.build import build_training
from moe.train.checkpoint.optimizer_state import OptimizerState
from moe.train.step import optimizer_step
from moe.validate import validate

ALIASES = {"ep": "parallel.ep_size", "zero": "train.zero_stage", "mbs": "train.micro_batch_size",
           "compile": "train.compile"}
LOSS_KINDS = ("aux_loss", "seq_aux_loss", "global_aux_loss", "z_loss")


class ParityError(ValueError):
    pass


def parse_layout(spec: str, default_nproc: Optional[int]) -> Tuple[Optional[int], List[str]]:
    """'ep=2,zero=1,nproc=4' -> (4, ['parallel.ep_size=2', 'train.zero_stage=1'])."""
    nproc, overrides = default_nproc, []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if "=" not in part:
            raise ParityError(f"layout {spec!r}: expected key=value, got {part!r}")
        key, value = part.split("=", 1)
        if key in ("nproc", "np"):
            if not value.strip().lstrip("-").isdigit():
                raise ParityError(f"layout {spec!r}: nproc must be an integer, got {value!r}")
            nproc = int(value)
        else:
            overrides.append(f"{ALIASES.get(key, key)}={value}")
    if nproc is not None and nproc < 1:
        raise ParityError(f"layout {spec!r}: nproc must be >= 1")
    return nproc, overrides


# ---------------------------------------------------------------------------------------- worker


def worker(config: str, overrides: List[str], steps: int, out: str, dump: Optional[str]) -> None:
    """One layout, in every process of it: N steps, then rank 0 writes the per-step records."""
    cfg = load_config(config, list(overrides) + [
        f"train.steps={steps}", "train.eval_every=0", "checkpoint.every=0", "checkpoint.save_final=false",
        "logging.wandb.mode=disabled", "logging.progress=false"])
    world = parallel.world_size_from_env()
    validate(cfg, world)
    setup = build_training(cfg, world)
    info, data, model, engine = setup.dist_info, setup.data, setup.model, setup.engine
    dtype, accum, layers = setup.dtype, setup.accum, setup.moe_layers
    rank = info.rank
    groups = model_groups(model)
    mbs = cfg.train.micro_batch_size
    # the run's own sampler (a mixture's MixtureSampler over data.sources): the same global batches at any layout
    sampler = make_sampler(data, cfg.train.seq_len, mbs, rank, world, seed=cfg.run.seed)
    names = {id(p): n for n, p in model.named_parameters()}

    def full(t: "torch.Tensor", p) -> "torch.Tensor":
        return gather_experts(t, groups) if is_expert_param(p) else t

    records: List[Dict[str, Any]] = []
    engine.train()
    for step in range(1, steps + 1):
        first = bool(dump) and step == 1
        result = optimizer_step(
            engine, model, sampler.next_batch, accum, info.device, dtype, keep_outputs=first,
            before_step=(lambda norm: _dump_grads(model, names, full, norm, dump, rank)) if first else None)
        grad_norm = result.grad_norm
        logits = [o.logits.detach().float().cpu() for o in result.outputs]
        loss_t = torch.tensor(result.loss, dtype=torch.float64)
        dist.all_reduce(loss_t)
        stats = router_metrics(layers)
        rec: Dict[str, Any] = {"step": step, "loss": float(loss_t) / world, "grad_norm": grad_norm,
                               "tokens_per_expert": {}}
        for kind in LOSS_KINDS:
            vals = [v for k, v in stats.items() if k.endswith("/" + kind)]
            rec[kind] = sum(vals) if vals else 0.0
        for lid in layers:
            rec["tokens_per_expert"][str(lid)] = stats.get(f"router/layer{lid}/tokens_per_expert", [])
        records.append(rec)
        if dump and step == 1:
            _dump_logits(logits, mbs, world, dump, rank)
    if dump:
        opt = OptimizerState(engine)
        weights = {n: full(opt.get_master(p), p) for n, p in model.named_parameters()}
        if rank == 0:
            from safetensors.torch import save_file

            save_file({n: w.contiguous() for n, w in weights.items()}, os.path.join(dump, "weights.safetensors"))
    if rank == 0:
        meta = {"world_size": world, "grad_accum": accum, "ep_size": cfg.parallel.ep_size,
                "zero_stage": cfg.train.zero_stage, "global_batch": global_batch_size(cfg, world)}
        atomic_write(out, json.dumps({"meta": meta, "steps": records}), secrets=False)
    parallel.shutdown_distributed()


def _dump_grads(model, names, full, grad_norm: float, dump: str, rank: int) -> None:
    grads = {}
    for p in model.parameters():
        if p.grad is not None:
            grads[names[id(p)]] = full(p.grad.detach().float().cpu(), p)
    if rank == 0:
        from safetensors.torch import save_file

        reference = float(torch.stack([g.norm() ** 2 for g in grads.values()]).sum().sqrt())
        save_file({n: g.contiguous() for n, g in grads.items()}, os.path.join(dump, "grads.safetensors"))
        with open(os.path.join(dump, "grad_norm.json"), "w") as f:
            json.dump({"grad_norm": grad_norm, "from_gathered_grads": reference}, f)


def _dump_logits(logits: list, mbs: int, world: int, dump: str, rank: int) -> None:
    """Logits of the first step's micro-batches, in the global batch order of the sampler: micro-batch
    m of rank r holds global sequences m*mbs*world + r*mbs + [0, mbs)."""
    local = torch.stack(logits)  # [accum, mbs, S, V]
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    if rank == 0:
        from safetensors.torch import save_file

        ordered = torch.stack(parts, dim=1)  # [accum, world, mbs, S, V]
        save_file({"logits": ordered.reshape(-1, *local.shape[2:]).contiguous()},
                  os.path.join(dump, "logits.safetensors"))


# ---------------------------------------------------------------------------------------- driver


def _rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return float("inf")
    return abs(a - b) / max(abs(b), 1e-12)


def _token_diff(a: Dict[str, list], b: Dict[str, list]) -> float:
    worst = 0.0
    for layer in set(a) | set(b):
        x, y = a.get(layer, []), b.get(layer, [])
        if len(x) != len(y):
            return float("inf")
        total = max(sum(y), 1)
        worst = max(worst, max((abs(u - v) for u, v in zip(x, y)), default=0) / total)
    return worst


def compare(results: List[Tuple[str, Dict[str, Any]]], tolerance: float, out=sys.stdout) -> List[str]:
    """Print the per-step table; return the failures (empty: all layouts match the first)."""
    ref_name, ref = results[0]
    failures = []
    cols = ["loss", "aux_loss", "seq_aux_loss", "global_aux_loss", "z_loss", "grad_norm"]
    # a loss column zero in every layout (its coefficient is 0) is left out of the table; one that is
    # non-zero in any layout stays, so a loss that appears only in some layout is a difference
    used = [c for c in cols if c in ("loss", "grad_norm") or any(r[c] for _, res in results for r in res["steps"])]
    width = max(24, max(len(n) for n, _ in results) + 2)
    header = f"{'step':>4}  {'layout':<{width}}" + "".join(f"{c:>25}" for c in used) + f"{'tokens/expert':>15}"
    print(f"reference: {ref_name}; columns: value (relative difference to the reference)", file=out)
    print(header, file=out)
    for i, r0 in enumerate(ref["steps"]):
        print(f"{r0['step']:>4}  {ref_name:<{width}}" + "".join(f"{r0[c]:>25.8g}" for c in used), file=out)
        for name, res in results[1:]:
            if i >= len(res["steps"]):
                failures.append(f"{name}: step {r0['step']} missing")
                continue
            r = res["steps"][i]
            cells = ""
            for c in used:
                d = _rel(r[c], r0[c])
                cells += f"{r[c]:>15.8g} ({d:.1e})"
                if not d <= tolerance:
                    failures.append(f"{name} step {r['step']}: {c} {r[c]:.8g} vs {r0[c]:.8g} (rel diff {d:.2e})")
            td = _token_diff(r["tokens_per_expert"], r0["tokens_per_expert"])
            if not td <= tolerance:
                failures.append(f"{name} step {r['step']}: per-expert token counts differ by {td:.2e} of the "
                                f"tokens: {r['tokens_per_expert']} vs {r0['tokens_per_expert']}")
            print(f"{'':>4}  {name:<{width}}" + cells + f"{td:>15.1e}", file=out)
    return failures


def run_layouts(config: str, overrides: List[str], layouts: List[str], steps: int, nproc: Optional[int],
                tolerance: float, workdir: str, dump: bool = False, env: Optional[Dict[str, str]] = None,
                timeout: int = 1800) -> Tuple[List[Tuple[str, Dict[str, Any]]], List[str]]:
    """Launch every layout (sequentially), then compare. Raises ParityError for a bad layout or a
    failed run (with the tail of its log)."""

    parsed = []
    max_ep = 1
    for spec in layouts:
        n, ov = parse_layout(spec, None)
        for o in ov:
            if o.startswith("parallel.ep_size="):
                max_ep = max(max_ep, int(o.split("=", 1)[1]))
        parsed.append((spec, n, ov))
    default_nproc = nproc or max_ep
    parsed = [(spec, n or default_nproc, ov) for spec, n, ov in parsed]
    base = load_config(config, overrides)
    extra = []
    if base.train.global_batch_size == 0:
        mbs_max = max(load_config(config, overrides + ov).train.micro_batch_size * n for _, n, ov in parsed)
        extra = [f"train.global_batch_size={mbs_max}"]
    for spec, n, ov in parsed:
        try:
            validate(load_config(config, overrides + extra + ov), n)
        except ConfigError as exc:
            raise ParityError(f"layout {spec!r} ({n} processes): {exc}") from None
    results = []
    for i, (spec, n, ov) in enumerate(parsed):
        out = os.path.join(workdir, f"layout{i}.json")
        dump_dir = os.path.join(workdir, f"layout{i}") if dump else None
        if dump_dir:
            os.makedirs(dump_dir, exist_ok=True)
        args = ["-m", "moe.tools.parity", "worker", config, *overrides, *extra, *ov, "--steps", str(steps), "--out", out]
        if dump_dir:
            args += ["--dump", dump_dir]
        cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
                                  if n > 1 else []) + args
        run_env = training_env({"WANDB_MODE": "disabled"})
        run_env.setdefault("OMP_NUM_THREADS", "1")
        run_env.update(env or {})
        print(f"[parity] {spec} ({n} process{'es' if n > 1 else ''})", flush=True)
        log = os.path.join(workdir, f"layout{i}.log")
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=run_env, timeout=timeout)
        if proc.returncode != 0 or not os.path.isfile(out):
            tail = open(log).read()[-4000:]
            raise ParityError(f"layout {spec!r} failed (exit {proc.returncode}); log {log}:\n{tail}")
        label = spec if "nproc" in spec or "np=" in spec else f"{spec},nproc={n}"
        results.append((label, json.load(open(out))))
    return results, compare(results, tolerance)


def main_parity(args) -> int:
    workdir = args.keep or tempfile.mkdtemp(prefix="moe-parity-")
    os.makedirs(workdir, exist_ok=True)
    try:
        results, failures = run_layouts(args.config, args.overrides, args.layouts, args.steps, args.nproc,
                                        args.tolerance, workdir, dump=args.dump)
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if failures:
        print(f"\nFAIL: {len(failures)} differences above {args.tolerance:g}:", file=sys.stderr)
        for f in failures[:20]:
            print(f"  {f}", file=sys.stderr)
        return 1
    print(f"\nOK: {len(results)} layouts agree within {args.tolerance:g} over {args.steps} steps")
    return 0


def _worker_main(argv: List[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m moe.tools.parity worker")
    p.add_argument("config")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dump", default=None)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    worker(a.config, a.overrides, a.steps, a.out, a.dump)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "worker":
        sys.exit("usage: python -m moe.tools.parity worker CONFIG --steps N --out FILE [--dump DIR] [overrides]")
    _worker_main(sys.argv[2:])
