"""The GPU check: one prepared run for a lent GPU machine (or `--device cpu --quick` as a smoke test).

    bash benchmarks/gpu_check.sh            # builds the CUDA extension, then runs this
    python -m benchmarks.gpu_check [--device cuda] [--dtype bf16] [--quick] [--json OUT]

In order, printing a short table last:
1. the card's measured copy bandwidth (a preallocated `dst.copy_(src)`) and bf16 matmul rate;
2. every dispatch op of the live backend against the pure-PyTorch reference on the device
   (forward and backward, including the gate-weight gradient), fp32 and the chosen dtype;
3. permute + unpermute forward/backward times at (T=8192, d=1024, E=8, k=2) and
   (T=16384, d=2048, E=64, k=8) in GB/s of the minimum bytes moved, as a fraction of the copy
   bandwidth (target: at least 70%), next to the reference;
4. the MoE layer (dropless) against a dense SwiGLU of the same active FLOPs, forward + backward;
5. a short training run of the quickstart MoE model in the chosen dtype: the loss must fall.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, reps):
    fn()
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def routing(T, E, k, device):
    scores = torch.rand(T, E, device=device)
    return torch.topk(scores, k, dim=-1).indices, torch.softmax(torch.randn(T, k, device=device), -1)


def check_ops(device, dtype, backend):
    from moe import ops

    worst = 0.0
    for T, d, E, k, cap in ((257, 64, 8, 2, None), (100, 32, 4, 4, None), (300, 48, 16, 1, 10), (1, 8, 4, 2, None)):
        idx, w = routing(T, E, k, device)
        x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
        prio = w if cap else None
        ref_i = ops.build_routing_index(idx, E, cap, prio, backend="reference")
        got_i = ops.build_routing_index(idx, E, cap, prio, backend=backend)
        assert torch.equal(ref_i.dest_rows, got_i.dest_rows), "routing index differs from the reference"
        outs = []
        for b, index in (("reference", ref_i), (backend, got_i)):
            xx = x.detach().clone().requires_grad_(True)
            ww = w.detach().clone().requires_grad_(True)
            y = ops.permute(xx, index, backend=b) * 1.5
            out = ops.unpermute(y, index, ww, backend=b)
            out.float().square().sum().backward()
            outs.append((out.detach().float(), xx.grad.float(), ww.grad.float()))
        for a, b in zip(*outs):
            worst = max(worst, float((a - b).abs().max() / (b.abs().max() + 1e-6)))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert worst < tol, f"ops differ from the reference by {worst:.2e} (tolerance {tol:.0e})"
    return worst


def bench_dispatch(device, dtype, shapes, reps, backend, copy_gbs):
    from moe import ops

    rows = []
    for T, d, E, k in shapes:
        idx, w = routing(T, E, k, device)
        x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
        elt = x.element_size()
        for b in (backend, "reference"):
            index = ops.build_routing_index(idx, E, None, None, backend=b)
            y = ops.permute(x, index, backend=b)
            out = ops.unpermute(y, index, w, backend=b)
            g = torch.randn_like(out)
            t_fwd = timeit(lambda: ops.unpermute(ops.permute(x, index, backend=b), index, w, backend=b), device, reps)
            t_bwd = timeit(lambda: torch.autograd.grad(out, (x,), g, retain_graph=True), device, reps)
            # minimum bytes: permute reads T*d, writes T*k*d; unpermute reads T*k*d, writes T*d (x2 for fwd+bwd)
            moved = 2 * (T * d + T * k * d) * elt
            rows.append({"shape": f"T={T} d={d} E={E} k={k}", "backend": b, "fwd_ms": 1e3 * t_fwd,
                         "bwd_ms": 1e3 * t_bwd, "fwd_GBs": moved / t_fwd / 1e9,
                         "fwd_vs_copy": moved / t_fwd / 1e9 / copy_gbs})
    return rows


def bench_layer(device, dtype, T, reps):
    from moe.config import load_config
    from moe.layer import DenseFFN, MoELayer

    cfg = load_config(None, ["model.vocab_size=16", "model.moe.num_experts=8", "model.moe.top_k=2",
                             "model.moe.expert_hidden=1024"]).model.moe
    moe = MoELayer(512, 1024, cfg, 0.02, 0.02).to(device, dtype)
    dense = DenseFFN(512, 2048, 0.02, 0.02).to(device, dtype)
    x = torch.randn(T, 512, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(T, 512, device=device, dtype=dtype)  # a dense output gradient, as in benchmarks/layer.py
    t_moe = timeit(lambda: moe(x).backward(g), device, reps)
    t_dense = timeit(lambda: dense(x).backward(g), device, reps)
    return {"T": T, "moe_ms": 1e3 * t_moe, "dense_ms": 1e3 * t_dense, "moe_over_dense": t_moe / t_dense}


def short_training(device, dtype, steps):
    from moe.config import load_config
    from moe.model import GPT

    cfg = load_config("experiments/quickstart_moe.yaml", ["model.vocab_size=257"])
    model = GPT(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    # a learnable toy stream: repeated random 32-token motifs
    motif = torch.randint(0, 257, (64, 32), generator=gen)
    losses = []
    for step in range(steps):
        rows = motif[torch.randint(0, 64, (8, 9), generator=gen)].reshape(8, -1)[:, :257].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(rows[:, :-1], rows[:, 1:])
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0] - 0.5, f"loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}"
    return {"first": losses[0], "last": losses[-1], "steps": steps}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--quick", action="store_true", help="small shapes (CPU smoke test)")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    from moe import ops

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    backend = ops.dispatch_backend("auto")
    reps = 3 if args.quick else 10
    n = 1 << (22 if args.quick else 28)
    src = torch.empty(n, device=device, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    copy_gbs = 2 * n / timeit(lambda: dst.copy_(src), device, reps) / 1e9
    m = 512 if args.quick else 8192
    a = torch.randn(m, m, device=device, dtype=dtype)
    tflops = 2 * m ** 3 / timeit(lambda: a @ a, device, reps) / 1e12
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "dtype": args.dtype,
              "backend": backend, "copy_GBs": copy_gbs, "matmul_TFLOPs": tflops}
    result["ops_max_rel_err_fp32"] = check_ops(device, torch.float32, backend)
    result["ops_max_rel_err"] = check_ops(device, dtype, backend)
    shapes = [(1024, 256, 8, 2)] if args.quick else [(8192, 1024, 8, 2), (16384, 2048, 64, 8)]
    result["dispatch"] = bench_dispatch(device, dtype, shapes, reps, backend, copy_gbs)
    result["layer"] = [bench_layer(device, dtype, T, reps) for T in ((256,) if args.quick else (1024, 4096, 16384))]
    result["training"] = short_training(device, dtype, 30 if args.quick else 200)

    print(f"\n{result['device']}, {args.dtype}, dispatch backend {backend}")
    print(f"copy bandwidth {copy_gbs:,.0f} GB/s (read+write); matmul {tflops:,.3f} TFLOP/s")
    print(f"ops vs reference: max rel err fp32 {result['ops_max_rel_err_fp32']:.1e}, {args.dtype} {result['ops_max_rel_err']:.1e}")
    print(f"{'dispatch shape':<28}{'backend':<11}{'fwd ms':>8}{'bwd ms':>8}{'fwd GB/s':>10}{'of copy':>9}")
    for r in result["dispatch"]:
        print(f"{r['shape']:<28}{r['backend']:<11}{r['fwd_ms']:>8.3f}{r['bwd_ms']:>8.3f}{r['fwd_GBs']:>10,.0f}{r['fwd_vs_copy']:>9.0%}")
    for r in result["layer"]:
        print(f"layer T={r['T']}: moe {r['moe_ms']:.2f} ms, dense {r['dense_ms']:.2f} ms, x{r['moe_over_dense']:.2f}")
    t = result["training"]
    print(f"training {t['steps']} steps: loss {t['first']:.3f} -> {t['last']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
