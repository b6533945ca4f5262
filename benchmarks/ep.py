"""Expert parallelism: training-step time and the token exchange's share of it at ep = 1, 2, 4.

    python -m benchmarks.ep [--config CFG] [--nproc N] [--eps 1 2 4] [--steps N] [--json OUT] [key=value ...]
    moe bench ep [...]

Every layout runs as N processes on this machine (torchrun --standalone, gloo on CPU, NCCL on GPUs)
with the same world size and global batch, so only the expert-parallel size changes: at ep = P each
rank holds E/P experts of every MoE layer and exchanges tokens with the P - 1 others of its group.
Each process times full DeepSpeed training steps (forward, backward with the gradient all-reduce,
AdamW step) on fixed random token batches after warm-up steps; the step time is the median over
steps of the slowest rank (a barrier ends each step). The exchange time is the wall time spent in
the token exchange's collectives (counts + rows, forward + backward, all MoE layers) per step on
the slowest rank, as `ep/exchange_s` reports it in training; the imbalance is max / mean rows the
ranks' experts computed.

On a CPU machine the N processes share its cores (1 thread each by default), so absolute times mix
compute contention with communication; the comparison across ep at a fixed world is the point.
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


def worker(config: str, overrides, steps: int, warmup: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from moe import parallel
    from moe.config import grad_accum_steps, load_config
    from moe.validate import validate
    from moe.parallel import ep_metrics
    from moe.nn.gpt import GPT
    from moe.routing.balancing import end_optimizer_step

    cfg = load_config(config, list(overrides) + ["logging.wandb.mode=disabled"])
    world = parallel.world_size_from_env()
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 257 if cfg.data.tokenizer == "bytes" else cfg.data.bpe_vocab_size
    validate(cfg, world)
    torch.set_num_threads(cfg.train.threads or 1)
    info = parallel.init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    torch.manual_seed(cfg.run.seed)
    model = GPT(cfg.model).to(info.device)
    accum = grad_accum_steps(cfg, world)
    engine, _, _, dtype = parallel.build_engine(model, cfg, info, accum)
    B, S, V = cfg.train.micro_batch_size, cfg.train.seq_len, cfg.model.vocab_size
    gen = torch.Generator().manual_seed(0)
    global_batch = torch.randint(0, V, (accum * world * B, S + 1), generator=gen)
    engine.train()
    times = []
    for i in range(warmup + steps):
        if i == warmup:
            ep_metrics(model, 1, 1.0)  # reset the exchange counters after warm-up
        dist.barrier()
        t0 = time.perf_counter()
        for m in range(accum):
            rows = global_batch[(m * world + info.rank) * B:(m * world + info.rank + 1) * B].to(info.device)
            with torch.autocast(info.device.type, dtype=dtype, enabled=dtype != torch.float32):
                o = engine(rows[:, :-1], rows[:, 1:])
            engine.backward(o.loss + o.aux_loss)
            engine.step()
        end_optimizer_step(model)
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    ep = ep_metrics(model, steps, sum(times))
    if info.rank == 0:
        with open(out, "w") as f:
            json.dump({"ep_size": cfg.parallel.ep_size, "world_size": world, "grad_accum": accum,
                       "tokens_per_step": accum * world * B * S, "step_s": step_s, "step_s_all": times,
                       "exchange_s": ep.get("ep/exchange_s", 0.0),
                       "rank_token_imbalance": ep.get("ep/rank_token_imbalance", 1.0),
                       "device": str(info.device), "num_experts": cfg.model.moe.num_experts,
                       "threads": torch.get_num_threads()}, f)
    parallel.shutdown_distributed()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ep", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="experiments/quickstart_moe.yaml")
    p.add_argument("--nproc", type=int, default=4, help="processes (world size) of every layout")
    p.add_argument("--eps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per rank per micro-batch")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    overrides = [f"train.global_batch_size={args.global_batch}", f"train.micro_batch_size={args.micro_batch}",
                 *args.overrides]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ep in args.eps:
            out = os.path.join(tmp, f"ep{ep}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
                   "-m", "benchmarks.ep", "worker", args.config, *overrides, f"parallel.ep_size={ep}",
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", out]
            env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=repo)
            env.setdefault("OMP_NUM_THREADS", "1")
            proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
            if proc.returncode != 0 or not os.path.isfile(out):
                sys.exit(f"ep={ep} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            rows.append(json.load(open(out)))
    r0 = rows[0]
    print(f"expert parallelism: {args.config}, {r0['num_experts']} experts/layer, world {r0['world_size']}, "
          f"{r0['tokens_per_step']} tokens/step (grad accum {r0['grad_accum']}), device {r0['device']}, "
          f"{r0['threads']} thread(s)/process, median of {args.steps} steps")
    print(f"{'ep':>3}{'experts/rank':>14}{'step ms':>10}{'tokens/s':>11}{'exchange ms':>13}{'exchange share':>16}"
          f"{'token imbalance':>17}")
    for r in rows:
        share = r["exchange_s"] / r["step_s"] if r["step_s"] else 0.0
        r["exchange_share"] = share
        print(f"{r['ep_size']:>3}{r['num_experts'] // r['ep_size']:>14}{1e3 * r['step_s']:>10.1f}"
              f"{r['tokens_per_step'] / r['step_s']:>11,.0f}{1e3 * r['exchange_s']:>13.1f}{100 * share:>15.1f}%"
              f"{r['rank_token_imbalance']:>17.3f}")
    result = {"config": args.config, "overrides": overrides, "nproc": args.nproc, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _worker_main(argv) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ep worker")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    worker(a.config, a.overrides, a.steps, a.warmup, a.out)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        _worker_main(sys.argv[2:])
    else:
        main()
