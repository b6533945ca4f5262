"""The GPU check: one prepared run for a lent GPU machine (or `--device cpu --quick` as a smoke test).

    bash benchmarks/gpu_check.sh            # builds the CUDA extension, runs the op tests on the card, then this
    python -m benchmarks.gpu_check [--device cuda] [--dtype bf16] [--quick] [--json OUT]

A GPU session is short and may end early, so the stages run one after the other, each prints its
lines as soon as it is done and the JSON (--json) is rewritten after each; a stage that fails is
recorded with its error (traceback on stderr) and the next one still runs. A summary is printed last.

1. device: the card's copy bandwidth (a preallocated `dst.copy_(src)`, read + write counted) and
   matmul rate in the chosen dtype;
2. ops: every dispatch op of the live backend against the pure-PyTorch reference on the device
   (routing index, forward and backward including the gate-weight gradient), fp32 and the dtype;
3. dispatch: permute and unpermute, forward and backward each, at (T=8192, d=1024, E=8, k=2) and
   (T=16384, d=2048, E=64, k=8) in the dtype: GB/s of the minimum bytes moved
   (benchmarks.dispatch_min_bytes) and its fraction of the copy bandwidth (target: at least 70%),
   ours next to the reference. Kernel time without launch gaps: `--iters` calls captured in one CUDA
   graph, the median replay timed with CUDA events (an eager loop, marked, where capture fails); the
   calls rotate over input sets totalling 3x the L2, so they read memory, not the cache; a backward
   is the backward alone (torch.autograd.grad of a retained forward graph);
4. layer: the MoE layer (dropless; d=512; E:k:h = 8:2:1024, and the fine-grained 64:8:256 and 128:8:128)
   forward + backward against a dense SwiGLU of the same active FLOPs (hidden k * h), eager: ours (compiled dispatch, `auto` experts:
   torch._grouped_mm in bf16), ours with the per-expert `loop` experts, and the pure-PyTorch
   dispatch reference; then dense and ours each captured in a CUDA graph (dropless routing makes no
   host sync, so the capture works; a failed capture is reported and the row marked eager) against
   each other;
5. training: steps of the quickstart MoE model (fp32 weights, autocast to the dtype, AdamW) on a
   learnable toy stream: the loss must fall (with --quick, the debug model on shorter steps);
6. compiled: the same with every block torch.compile-d (`train.compile=true`) next to eager: the
   compile time, steady-state tokens/s of both and how far the losses drift apart.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback

import torch

from benchmarks import DISPATCH_OPS, dispatch_min_bytes

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_time(fns, device, reps, iters=20, graph=True):
    """(seconds per call, how it was timed) of the callables `fns`, called in turn (distinct input sets,
    so that repeated calls do not just read the L2 cache). CUDA: `iters` calls captured in one CUDA
    graph and replayed ("graph": kernel time without launch gaps), else `iters` eager calls ("eager");
    both between CUDA events, the median of `reps` replays. The capture runs on the current stream:
    autograd graphs that a call runs backward through must be built on it. CPU: the median of `reps`
    single calls."""
    import statistics

    fns = list(fns) if isinstance(fns, (list, tuple)) else [fns]
    if device.type != "cuda":
        for fn in fns:
            fn()
        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            fns[i % len(fns)]()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), "eager"

    def calls():
        for i in range(iters):
            fns[i % len(fns)]()

    calls()  # warm-up: module loads, handles, allocator blocks
    torch.cuda.synchronize()
    run, how = calls, "eager"
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=torch.cuda.current_stream()):
                calls()
            torch.cuda.synchronize()
            run, how = g.replay, "graph"
        except Exception as exc:  # e.g. an op that syncs with the host: time it eagerly
            print(f"  (CUDA graph capture failed, timing eagerly: {type(exc).__name__}: {str(exc)[:120]})")
            torch.cuda.synchronize()
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(times), how


def input_sets(bytes_per_set, device):
    """How many distinct input sets keep repeated calls from being served by the L2 cache: their total
    at least three times the L2 (H200: 60 MB); one on the CPU."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    return max(1, min(16, -(-3 * l2 // max(1, bytes_per_set))))


def poison(device, dtype, *numels):
    """Leave NaN in the allocator's free blocks of these sizes, so that an output element an op fails
    to write shows up as NaN instead of a stale right answer from an earlier run."""
    blocks = [torch.full((n,), float("nan"), device=device, dtype=dtype) for n in numels if n > 0]
    del blocks


def routing(T, E, k, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    gates = torch.softmax(torch.randn(T, k, generator=g), -1)
    return torch.topk(scores, k, dim=-1).indices.to(device), gates.to(device)


# ------------------------------------------------------------------------------------------ stages

def stage_device(args, device, dtype, state):
    n = 1 << (22 if args.quick else 28)
    src = torch.empty(n, device=device, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    t_copy, _ = device_time(lambda: dst.copy_(src), device, args.reps, iters=5, graph=False)
    m = 512 if args.quick else 8192
    a = torch.randn(m, m, device=device, dtype=dtype)
    t_mm, _ = device_time(lambda: a @ a, device, args.reps, iters=5, graph=False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    state["copy_GBs"] = 2 * n / t_copy / 1e9
    res = {"name": name, "torch": torch.__version__, "copy_GBs": state["copy_GBs"],
           "matmul_TFLOPs": 2 * m ** 3 / t_mm / 1e12}
    print(f"{name}, torch {torch.__version__}: copy {res['copy_GBs']:,.0f} GB/s (read+write), "
          f"matmul {res['matmul_TFLOPs']:,.1f} TFLOP/s in {args.dtype}")
    return res


def _check_ops(device, dtype, backend):
    from moe import ops

    worst = 0.0
    for T, d, E, k, cap in ((257, 64, 8, 2, None), (100, 32, 4, 4, None), (300, 48, 16, 1, 10), (1, 8, 4, 2, None)):
        idx, w = routing(T, E, k, device)
        x = torch.randn(T, d, device=device, dtype=dtype)
        prio = w if cap else None
        ref_i = ops.build_routing_index(idx, E, cap, prio, backend="reference")
        got_i = ops.build_routing_index(idx, E, cap, prio, backend=backend)
        assert torch.equal(ref_i.dest_rows, got_i.dest_rows), f"routing index differs from the reference (T={T})"
        assert torch.equal(ref_i.tokens_per_expert, got_i.tokens_per_expert), "tokens_per_expert differ"
        outs = []
        for b, index in (("reference", ref_i), (backend, got_i)):
            R = index.num_rows
            poison(device, dtype, R * d, T * d, T * k)
            xx = x.clone().requires_grad_(True)
            ww = w.clone().requires_grad_(True)
            y = ops.permute(xx, index, backend=b) * 1.5
            out = ops.unpermute(y, index, ww, backend=b)
            out.float().square().sum().backward()
            outs.append((out.detach().float(), xx.grad.float(), ww.grad.float()))
        for a, b in zip(*outs):
            assert not a.isnan().any(), f"NaN in an output of the {backend} ops (an element not written?), T={T}"
            worst = max(worst, float((a - b).abs().max() / (b.abs().max() + 1e-6)))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert worst < tol, f"ops differ from the reference by {worst:.2e} in {dtype} (tolerance {tol:.0e})"
    return worst


def stage_ops(args, device, dtype, state):
    res = {"backend": state["backend"], "max_rel_err_fp32": _check_ops(device, torch.float32, state["backend"])}
    res["max_rel_err"] = _check_ops(device, dtype, state["backend"])
    print(f"ops ({state['backend']}) vs reference: max rel err fp32 {res['max_rel_err_fp32']:.1e}, "
          f"{args.dtype} {res['max_rel_err']:.1e}")
    return res


def stage_dispatch(args, device, dtype, state):
    from moe import ops

    shapes = [(1024, 256, 8, 2)] if args.quick else [(8192, 1024, 8, 2), (16384, 2048, 64, 8)]
    rows = []
    for T, d, E, k in shapes:
        idx, w = routing(T, E, k, device)
        for b in dict.fromkeys((state["backend"], "reference")):
            index = ops.build_routing_index(idx, E, backend=b)
            R = index.num_rows
            need = dispatch_min_bytes(T, R, d, dtype.itemsize)
            sets = []
            for _ in range(input_sets(max(need.values()), device)):
                x = torch.randn(T, d, device=device, dtype=dtype)
                y = torch.randn(R, d, device=device, dtype=dtype)
                grad_out = torch.randn(T, d, device=device, dtype=dtype)
                xg, yg, wg = x.clone().requires_grad_(), y.clone().requires_grad_(), w.clone().requires_grad_()
                sets.append(dict(x=x, y=y, g=grad_out, xg=xg, yg=yg, wg=wg, permuted=ops.permute(xg, index, backend=b),
                                 combined=ops.unpermute(yg, index, wg, backend=b)))
            fns = {
                "permute fwd": [lambda s=s_: ops.permute(s["x"], index, backend=b) for s_ in sets],
                "permute bwd": [lambda s=s_: torch.autograd.grad(s["permuted"], s["xg"], s["y"], retain_graph=True)
                                for s_ in sets],
                "unpermute fwd": [lambda s=s_: ops.unpermute(s["y"], index, w, backend=b) for s_ in sets],
                "unpermute bwd": [lambda s=s_: torch.autograd.grad(s["combined"], (s["yg"], s["wg"]), s["g"],
                                                                   retain_graph=True) for s_ in sets],
            }
            for op in DISPATCH_OPS:
                t, how = device_time(fns[op], device, args.reps, iters=args.iters)
                gbs = need[op] / t / 1e9
                rows.append({"shape": f"T={T} d={d} E={E} k={k}", "backend": b, "op": op, "ms": 1e3 * t,
                             "GBs": gbs, "of_copy": gbs / state["copy_GBs"], "timing": how, "input_sets": len(sets)})
                r = rows[-1]
                print(f"  {r['shape']:<26}{b:<11}{op:<15}{r['ms']:>9.3f} ms{gbs:>9,.0f} GB/s{r['of_copy']:>6.0%} "
                      f"of copy ({how}, {len(sets)} input sets)")
            del sets, fns
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


LAYER_SHAPES = ((8, 2, 1024), (64, 8, 256), (128, 8, 128))  # E experts of hidden h, top-k (issue 20's shapes)


def stage_layer(args, device, dtype, state):
    """One FFN layer, forward + backward, at coarse (8 of hidden 1024, top-2) and fine-grained (64 x 256,
    128 x 128, top-8) expert shapes, each against the dense SwiGLU of the same active hidden k * h."""
    from moe.config import load_config
    from moe.nn.ffn import DenseFFN
    from moe.nn.moe_layer import MoELayer

    def moe_layer(E, k, h, *overrides):
        torch.manual_seed(0)
        cfg = load_config(None, ["model.vocab_size=16", f"model.moe.num_experts={E}", f"model.moe.top_k={k}",
                                 f"model.moe.expert_hidden={h}", *overrides]).model.moe
        return MoELayer(512, h, cfg, 0.02, 0.02).to(device, dtype)

    rows = []
    for E, k, h in LAYER_SHAPES[:2] if args.quick else LAYER_SHAPES:
        shape = f"{E}:{k}:{h}"
        variants = {"dense": DenseFFN(512, k * h, 0.02, 0.02).to(device, dtype), "ours": moe_layer(E, k, h),
                    "ours, loop experts": moe_layer(E, k, h, "model.moe.experts_impl=loop"),
                    "reference dispatch": moe_layer(E, k, h, "model.moe.dispatch=reference")}
        for T in ((256,) if args.quick else (1024, 4096, 16384)):
            x = torch.randn(T, 512, device=device, dtype=dtype, requires_grad=True)
            g = torch.randn(T, 512, device=device, dtype=dtype)  # a dense output gradient
            times = {}
            for name, mod in variants.items():
                times[name] = device_time(lambda m=mod: m(x).backward(g), device, args.reps, iters=5, graph=False)
            # dropless dispatch makes no host sync, so forward + backward can be captured: launch gaps gone
            # (a capture that fails says why, and the row is marked eager)
            for name in ("dense", "ours") if device.type == "cuda" else ():
                times[f"{name}, CUDA graph"] = device_time(lambda m=variants[name]: m(x).backward(g), device,
                                                          args.reps, iters=5, graph=True)
            here = []
            for name, (t, how) in times.items():
                base = times["dense, CUDA graph" if name.endswith("CUDA graph") else "dense"][0]
                here.append({"shape": shape, "T": T, "variant": name, "ms": 1e3 * t, "vs_dense": t / base,
                             "timing": how})
            rows += here
            print(f"  layer {shape} T={T}: " + ", ".join(
                f"{r['variant']} {r['ms']:.2f} ms (x{r['vs_dense']:.2f}, {r['timing']})" for r in here))
        del variants
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def step_shape(quick):
    """(sequences, tokens each) of a training step."""
    return (4, 128) if quick else (8, 256)


def _train(device, dtype, steps, quick, compile_blocks=False):
    """Steps of the quickstart MoE model (the debug one with --quick: a smoke test, not a timing) in fp32
    weights, autocast to dtype, AdamW, on a learnable toy stream (repeated 32-token motifs):
    (losses, seconds per step), both per step."""
    from moe.config import load_config
    from moe.nn.gpt import GPT
    from moe.parallel import apply_compile

    config = "experiments/debug_moe.yaml" if quick else "experiments/quickstart_moe.yaml"
    cfg = load_config(config, ["model.vocab_size=257", "model.max_seq_len=256"])
    torch.manual_seed(0)
    model = GPT(cfg.model).to(device)
    if compile_blocks:
        apply_compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    motif = torch.randint(0, 257, (64, 32), generator=gen)
    losses, times = [], []
    batch, seq = step_shape(quick)
    for _ in range(steps):
        rows = motif[torch.randint(0, 64, (batch, seq // 32 + 1), generator=gen)].reshape(batch, -1)
        rows = rows[:, :seq + 1].to(device)
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(rows[:, :-1], rows[:, 1:])
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))  # syncs
        times.append(time.perf_counter() - t0)
    return losses, times


def stage_training(args, device, dtype, state):
    steps = 30 if args.quick else 200
    losses, times = _train(device, dtype, steps, args.quick)
    batch, seq = step_shape(args.quick)
    res = {"steps": steps, "first": losses[0], "last": losses[-1], "tokens_per_s": steps * batch * seq / sum(times)}
    print(f"training {steps} steps: loss {res['first']:.3f} -> {res['last']:.3f}, {res['tokens_per_s']:,.0f} tokens/s")
    assert res["last"] < res["first"] - 0.5, f"loss did not fall: {res['first']:.3f} -> {res['last']:.3f}"
    return res


def stage_compiled(args, device, dtype, state):
    """The same training with every block torch.compile-d (`train.compile=true`), next to eager: the
    compile time (first step), steady-state tokens/s of both, and how far the losses drift apart."""
    import statistics

    steps = 12 if args.quick else 60
    eager_losses, eager_times = _train(device, dtype, steps, args.quick)
    losses, times = _train(device, dtype, steps, args.quick, compile_blocks=True)
    steady = slice(steps // 3, None)  # after compilation and warm-up
    batch, seq = step_shape(args.quick)
    tok = batch * seq
    res = {"steps": steps, "first_step_s": times[0], "first": losses[0], "last": losses[-1],
           "tokens_per_s": tok / statistics.median(times[steady]),
           "eager_tokens_per_s": tok / statistics.median(eager_times[steady]),
           "max_loss_diff": max(abs(a - b) for a, b in zip(losses, eager_losses))}
    res["speedup"] = res["tokens_per_s"] / res["eager_tokens_per_s"]
    print(f"compiled training {steps} steps: loss {res['first']:.3f} -> {res['last']:.3f}; first step "
          f"{res['first_step_s']:.1f} s; {res['tokens_per_s']:,.0f} vs eager {res['eager_tokens_per_s']:,.0f} tokens/s "
          f"(x{res['speedup']:.2f}); max loss difference to eager {res['max_loss_diff']:.3g}")
    assert res["last"] < res["first"] - 0.3, f"loss did not fall: {res['first']:.3f} -> {res['last']:.3f}"
    return res


STAGES = {"device": stage_device, "ops": stage_ops, "dispatch": stage_dispatch, "layer": stage_layer,
          "training": stage_training, "compiled": stage_compiled}


def print_summary(result):
    print(f"\n==== GPU check summary: {result.get('device', {}).get('name', '?')}, {result['dtype']}, "
          f"dispatch backend {result['backend']}")
    for stage in STAGES:
        r = result.get(stage)
        if isinstance(r, dict) and "error" in r:
            print(f"{stage}: FAILED: {r['error']}")
    dev = result.get("device", {})
    if "copy_GBs" in dev:
        print(f"copy {dev['copy_GBs']:,.0f} GB/s; matmul {dev['matmul_TFLOPs']:,.1f} TFLOP/s")
    ops_r = result.get("ops", {})
    if "max_rel_err" in ops_r:
        print(f"ops vs reference: max rel err fp32 {ops_r['max_rel_err_fp32']:.1e}, {result['dtype']} "
              f"{ops_r['max_rel_err']:.1e}")
    if isinstance(result.get("dispatch"), list):
        print(f"{'dispatch shape':<26}{'backend':<11}{'op':<15}{'ms':>9}{'GB/s':>9}{'of copy':>9}  timing")
        for r in result["dispatch"]:
            print(f"{r['shape']:<26}{r['backend']:<11}{r['op']:<15}{r['ms']:>9.3f}{r['GBs']:>9,.0f}"
                  f"{r['of_copy']:>9.0%}  {r['timing']}")
    if isinstance(result.get("layer"), list):
        print(f"{'layer':<11}{'T':<7}{'variant':<22}{'ms':>9}{'x dense':>9}  timing")
        for r in result["layer"]:
            print(f"{r['shape']:<11}{r['T']:<7}{r['variant']:<22}{r['ms']:>9.2f}{r['vs_dense']:>9.2f}  {r['timing']}")
    t = result.get("training", {})
    if "last" in t:
        print(f"training {t['steps']} steps: loss {t['first']:.3f} -> {t['last']:.3f}, {t['tokens_per_s']:,.0f} tokens/s")
    c = result.get("compiled", {})
    if "speedup" in c:
        print(f"compiled training: first step {c['first_step_s']:.1f} s, {c['tokens_per_s']:,.0f} tokens/s "
              f"(x{c['speedup']:.2f} eager), max loss difference {c['max_loss_diff']:.3g}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true", help="small shapes (CPU smoke test)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions, best taken (default 10, quick 3)")
    p.add_argument("--iters", type=int, default=20, help="dispatch op calls per CUDA graph / timed loop")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    args.reps = args.reps or (3 if args.quick else 10)
    from moe import ops

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    backend = ops.dispatch_backend("auto")
    if backend == "extension" and device.type not in ops.extension_devices():
        print(f"moe._C has no {device.type} kernels (it has: {', '.join(ops.extension_devices())}): the dispatch "
              "ops below run the reference; see the extension build's output above")
        backend = "reference"
    state = {"backend": backend, "copy_GBs": float("nan")}
    result = {"dtype": args.dtype, "backend": state["backend"], "argv": sys.argv[1:] if argv is None else argv}
    # CUDA graphs cannot be captured on the default stream: every stage runs on a side stream (autograd
    # runs each backward op on its forward op's stream, so captured backwards land there too)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    for stage in args.stages:
        print(f"\n== {stage}", flush=True)
        t0 = time.perf_counter()
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                result[stage] = STAGES[stage](args, device, dtype, state)
        except Exception as exc:
            traceback.print_exc()
            result[stage] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            print(f"{stage} FAILED: {result[stage]['error']}")
        print(f"({stage}: {time.perf_counter() - t0:.1f} s)", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    print_summary(result)
    return result


if __name__ == "__main__":
    result = main()
    sys.exit(1 if any(isinstance(r, dict) and "error" in r for r in result.values()) else 0)
