"""Token-dispatch benchmark: permute / unpermute, forward and backward, fp32 on CPU.

    python -m benchmarks.dispatch [--quick] [--json OUT] [--reps N] [--threads N] [--system-alloc]

Implementations compared, all on the same inputs (dropless top-k routing, k distinct experts per token):

- ours:       moe.ops with backend="extension" (the compiled moe._C ops);
- megatron:   megatron.core.transformer.moe.moe_utils.permute / unpermute (the non-fused PyTorch path),
              routing_map = one-hot bool mask [T, E], probs = gate weights scattered to [T, E];
              its permute time includes turning the routing map into sorted indices, as in megatron;
- reference:  the pure-PyTorch reference in moe/ops/reference.py;
- copy:       the machine's copy bandwidth in the same run: a preallocated `dst.copy_(src)` of the size
              of the permuted buffer [T * k, d], counted as read + write (2 * size bytes), timed
              right before every timed op run (best of all). torch's copy uses ordinary stores (each
              written line is read first); ours streams large outputs past the cache, so an op can
              show more than 100% of it.

Minimum bytes moved (fp32, 4 bytes per element; R = T * k kept rows; index and gate-weight traffic,
under 1% here, is not counted). Each input element must be read once and each output element written
once, so:

- permute fwd:    read x once (T * d)            + write the permuted buffer (R * d);
- permute bwd:    read grad of the buffer (R * d) + write grad_x (T * d);
- unpermute fwd:  read y (R * d)                  + write out (T * d);
- unpermute bwd:  read grad_out (T * d) + read y (R * d, for the gate-weight grads) + write grad_y (R * d).

GB/s = minimum bytes / time (best of --reps timed runs after a warm-up, rounds interleaved across
implementations). Backward times are the backward alone: torch.autograd.grad on a retained forward
graph (built, untimed, right before).

Allocation. Every implementation returns freshly allocated outputs. With glibc's default malloc,
blocks above 32 MiB are mmap-ed and returned to the OS on free, so *every* call page-faults its
outputs in again (about 2 us per 4 KiB page on this VM: a 1 GiB output costs ~0.6 s, several times
the copy itself). That is a property of the process allocator, not of the dispatch kernels, and
affects every implementation. By default the benchmark therefore keeps freed memory in the process
(moe.train.host_memory.keep_freed_memory: glibc mmap off, no trimming; what `moe train` does by default,
and the steady state jemalloc/tcmalloc or a caching allocator give); free pages go back to the OS
(malloc_trim) between measurements to bound the peak memory (~14 GiB for the full run).
`--system-alloc` keeps the default allocator (the moe._C ops then ask for transparent huge pages
on their large outputs, which makes first touch ~3x cheaper).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

from benchmarks import DISPATCH_OPS, dispatch_min_bytes

SHAPES_FULL = [(8192, 1024, 8, 2), (16384, 2048, 64, 8)]
SHAPES_QUICK = [(2048, 512, 8, 2), (4096, 512, 32, 4)]
OPS = list(DISPATCH_OPS)
IMPLS = ["ours", "megatron", "reference"]


def _parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.dispatch", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    p.add_argument("--quick", action="store_true", help=f"small shapes {SHAPES_QUICK} instead of {SHAPES_FULL}")
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default 8, quick 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: the CPUs this process may use)")
    p.add_argument("--system-alloc", action="store_true",
                   help="keep glibc's default malloc (outputs page-faulted on every call)")
    p.add_argument("--no-megatron", action="store_true", help="skip megatron-core")
    return p.parse_args(argv)


def _release_free_memory() -> None:
    """With mmap off, glibc never shrinks the heap and big blocks of varying sizes fragment it; give
    the free pages back between phases (the warm-up run of the next phase faults its outputs in)."""
    from moe.train.host_memory import release_free_memory

    gc.collect()
    release_free_memory()


def _megatron():
    try:
        from megatron.core.transformer.moe import moe_utils
    except Exception as e:  # not installed / import error
        print(f"megatron-core unavailable: {e!r}", file=sys.stderr)
        return None
    return moe_utils


def _bench_shape(T, d, E, k, reps, moe_utils):
    import torch

    from moe import ops

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=g)
    top_w, top_e = torch.softmax(logits, -1).topk(k, dim=-1)
    expert_indices, gate_weights = top_e.contiguous(), top_w.contiguous()
    index = ops.build_routing_index(expert_indices, E, backend="extension")
    R = index.num_rows
    x = torch.randn(T, d, generator=g)
    y = torch.randn(R, d, generator=g)
    grad_out = torch.randn(T, d, generator=g)
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter_(1, expert_indices, True)
    probs = torch.zeros(T, E).scatter_(1, expert_indices, gate_weights)

    fwd = {
        "ours": (lambda a: ops.permute(a, index, backend="extension"),
                 lambda a, w: ops.unpermute(a, index, w, backend="extension")),
        "reference": (lambda a: ops.permute_reference(a, index),
                      lambda a, w: ops.unpermute_reference(a, index, w)),
    }
    if moe_utils is not None:
        sorted_indices = moe_utils.permute(x, routing_map, num_out_tokens=R)[2]
        fwd["megatron"] = (lambda a: moe_utils.permute(a, routing_map, num_out_tokens=R)[0],
                           lambda a, w: moe_utils.unpermute(a, sorted_indices, (T, d), probs=w,
                                                            routing_map=routing_map))
    # same outputs (all three lay rows out expert-major, token order within an expert)
    for name, (p, u) in fwd.items():
        if name == "ours":
            continue
        torch.testing.assert_close(p(x), fwd["ours"][0](x), rtol=0, atol=0)
        w_in = probs if name == "megatron" else gate_weights
        torch.testing.assert_close(u(y, w_in), fwd["ours"][1](y, gate_weights), rtol=1e-5, atol=1e-5)

    unit = 4
    min_bytes = dispatch_min_bytes(T, R, d, unit)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    # copy bandwidth: a preallocated dst.copy_(src) of the permuted buffer's size [R, d] (own src, so no
    # op leaves it in cache), timed before every timed run of every op (the machine may be shared:
    # all see the same conditions; best of all)
    src, dst = torch.randn(R, d, generator=g), torch.empty(R, d)
    dst.zero_()
    copy_t = []

    def measure(makers):
        """makers: {impl: make}, make() -> thunk (built fresh each round: a forward graph is only
        alive while its backward is timed, which keeps peak memory down). Round 0 is a warm-up (it
        faults in the outputs' memory, which the allocator then reuses); then `reps` rounds,
        interleaved across implementations, each timed run right after a timed copy."""
        _release_free_memory()
        times = {n: [] for n in makers}
        for rnd in range(reps + 1):
            for n, make in makers.items():
                thunk = make()
                if rnd == 0:
                    thunk()
                else:
                    copy_t.append(timed(lambda: dst.copy_(src)))  # noqa: F821  (pyflakes misreads the del below)
                    times[n].append(timed(thunk))
                del thunk
        return times

    def backward_thunk(op, n):
        if op == "permute bwd":  # grad of the permuted buffer: y has its shape
            xl = x.detach().requires_grad_(True)
            out = fwd[n][0](xl)
            return lambda: torch.autograd.grad(out, xl, y, retain_graph=True)
        yl = y.detach().requires_grad_(True)
        wl = (probs if n == "megatron" else gate_weights).detach().clone().requires_grad_(True)
        out = fwd[n][1](yl, wl)
        return lambda: torch.autograd.grad(out, (yl, wl), grad_out, retain_graph=True)

    impls = [i for i in IMPLS if i in fwd]
    weights = {n: probs if n == "megatron" else gate_weights for n in impls}
    results = {
        "permute fwd": measure({n: (lambda p=fwd[n][0]: (lambda: p(x))) for n in impls}),
        "unpermute fwd": measure({n: (lambda u=fwd[n][1], w=weights[n]: (lambda: u(y, w))) for n in impls}),
        "permute bwd": measure({n: (lambda n=n: backward_thunk("permute bwd", n)) for n in impls}),
        "unpermute bwd": measure({n: (lambda n=n: backward_thunk("unpermute bwd", n)) for n in impls}),
    }
    # routing index build (time only), ours vs reference
    index_times = measure({
        "ours": lambda: (lambda: ops.build_routing_index(expert_indices, E, backend="extension")),
        "reference": lambda: (lambda: ops.build_routing_index_reference(expert_indices, E))})

    copy_gbps = 2 * R * d * unit / min(copy_t) / 1e9
    del src, dst
    rows = []
    for op in OPS:
        for n in impls:
            t = min(results[op][n])
            rows.append(dict(op=op, impl=n, time_s=t, median_s=sorted(results[op][n])[len(results[op][n]) // 2],
                             bytes=min_bytes[op], gbps=min_bytes[op] / t / 1e9,
                             frac_copy=min_bytes[op] / t / 1e9 / copy_gbps))
    for n, ts in index_times.items():
        rows.append(dict(op="routing index", impl=n, time_s=min(ts), median_s=sorted(ts)[len(ts) // 2]))
    return dict(T=T, d=d, E=E, k=k, rows_permuted=R, dtype="float32", copy_gbps=copy_gbps,
                copy_bytes=2 * R * d * unit, copy_time_s=min(copy_t), results=rows)


def _print_shape(res):
    print(f"\nT={res['T']} d={res['d']} E={res['E']} k={res['k']} (R={res['rows_permuted']} rows, fp32)   "
          f"copy: {res['copy_gbps']:.1f} GB/s  (dst.copy_(src), {res['copy_bytes'] / 2 / 2**20:.0f} MiB)")
    print(f"  {'op':<15}{'impl':<11}{'time ms':>10}{'GB/s':>8}{'% copy':>8}{'vs megatron':>13}{'vs reference':>14}")
    by = {(r["op"], r["impl"]): r for r in res["results"]}
    for r in res["results"]:
        meg, ref = by.get((r["op"], "megatron")), by.get((r["op"], "reference"))
        gb = f"{r['gbps']:8.1f}{100 * r['frac_copy']:7.0f}%" if "gbps" in r else f"{'':8}{'':8}"
        vs_m = f"{meg['time_s'] / r['time_s']:12.1f}x" if meg and r["impl"] == "ours" else f"{'':13}"
        vs_r = f"{ref['time_s'] / r['time_s']:13.1f}x" if ref and r["impl"] == "ours" else f"{'':14}"
        print(f"  {r['op']:<15}{r['impl']:<11}{1e3 * r['time_s']:10.2f}{gb}{vs_m}{vs_r}")


def main(argv=None) -> int:
    args = _parse(argv)
    import torch

    from moe import ops
    from moe.train.host_memory import keep_freed_memory

    reused = not args.system_alloc and keep_freed_memory()

    if not ops.extension_available():
        print("moe._C is not built: run `pip install --no-build-isolation -e .` first", file=sys.stderr)
        return 2
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    reps = args.reps or (3 if args.quick else 8)
    moe_utils = None if args.no_megatron else _megatron()
    alloc = "freed memory kept for reuse" if reused else "system default"
    print(f"token dispatch benchmark: torch {torch.__version__}, {threads} threads, {platform.processor() or platform.machine()}, "
          f"allocator: {alloc}, best of {reps}")
    start = time.perf_counter()
    shapes = []
    for T, d, E, k in (SHAPES_QUICK if args.quick else SHAPES_FULL):
        res = _bench_shape(T, d, E, k, reps, moe_utils)
        gc.collect()
        _print_shape(res)
        sys.stdout.flush()
        shapes.append(res)
    try:
        import resource

        peak = f", peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"
    except Exception:
        peak = ""
    print(f"\ntotal {time.perf_counter() - start:.0f}s{peak}")
    if args.json:
        out = dict(torch=torch.__version__, threads=threads, reps=reps, allocator=alloc, quick=args.quick,
                   megatron=moe_utils is not None, shapes=shapes)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
