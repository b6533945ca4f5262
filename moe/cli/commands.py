"""What each `moe` command does: parse-free functions of the argparse namespace.

Each command imports its own stack inside the function (torch, DeepSpeed, matplotlib, W&B through the
moe modules it needs): `moe --help`, `moe compare` or `moe launch --dry-run` must not pay the seconds
that importing DeepSpeed costs. This is the one place in moe/ where moe modules are imported inside
functions, and only to defer those heavy third-party libraries.
"""
from __future__ import annotations

import json
import os
import sys
from typing import NoReturn


def debug_mode() -> bool:
    """MOE_DEBUG=1: show tracebacks instead of the one `error:` line."""
    return os.environ.get("MOE_DEBUG", "") not in ("", "0")


def die(msg: str) -> NoReturn:
    if debug_mode() and sys.exc_info()[1] is not None:
        raise  # MOE_DEBUG=1: the traceback of the error being handled, instead of the one line
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def cmd_train(args) -> None:
    from moe.config import ConfigError, load_config
    from moe.launch import job_launcher
    from moe.train.loop import train

    overrides = list(args.overrides)
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID") and \
            not any(o.startswith("run.name=") for o in overrides):
        # started by `wandb agent`: each agent run needs its own run folder
        stem = os.path.splitext(os.path.basename(args.config))[0]
        overrides.append(f"run.name={stem}-{os.environ['WANDB_RUN_ID']}")
    try:
        cfg = load_config(args.config, overrides)
        train(cfg, launcher=job_launcher())  # what to do after a preemption warning: the launcher says
    except ConfigError as exc:
        die(str(exc))
    except FileNotFoundError as exc:
        die(str(exc))


def cmd_compare(args) -> None:
    from moe.analysis.compare import ReportError, compare_runs

    try:
        table = compare_runs(args.runs, args.out)
    except ReportError as exc:
        die(str(exc))
    print(table)
    print(f"\nplots and compare.md written to {args.out}")


def cmd_generate(args) -> None:
    from moe.errors import MoeError
    from moe.tools.inference import check_sampling_args, generate, load_run

    try:
        # the flags first: a bad one is an error line, not a traceback after loading the model
        check_sampling_args(args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
        model, tok, _ = load_run(args.run_dir, args.tag)
        ids = generate(model, tok.encode(args.prompt), args.max_new_tokens, args.temperature, args.top_k,
                       args.top_p, args.seed, eos_id=tok.eos_id)
    except (MoeError, FileNotFoundError) as exc:
        die(str(exc))
    print(args.prompt + tok.decode(ids))


def cmd_eval(args) -> None:
    from moe.data import tokenize_file_for_eval
    from moe.errors import MoeError
    from moe.tools.inference import evaluate_dataset, evaluate_tasks, load_run, tasks_table

    if args.tasks is not None:
        try:
            report = evaluate_tasks(args.run_dir, args.tasks, args.include_path, args.limit, args.num_fewshot,
                                    args.batch_size, args.tag, args.out)
        except (MoeError, FileNotFoundError) as exc:
            die(str(exc))
        print(tasks_table(report))
        if args.out:
            print(f"\nresults written to {args.out}")
        return
    try:
        model, tok, cfg = load_run(args.run_dir, args.tag)
        dataset = tokenize_file_for_eval(args.data, tok, cfg.data.cache_dir, cfg.data.text_field)
        seq_len = args.seq_len or cfg.train.seq_len
        result = evaluate_dataset(model, dataset, seq_len, args.batch_size, args.max_batches)
    except (FileNotFoundError, ValueError) as exc:
        die(str(exc))
    result["data"] = args.data
    result["run"] = args.run_dir
    print(json.dumps(result, indent=2))


def _launch_options(args, config: str, overrides, local: int = 0, array=None):
    from moe.launch import LaunchOptions

    return LaunchOptions(
        config=config, overrides=list(overrides), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        local=local, partition=args.partition, account=args.account, qos=args.qos, time=args.time,
        constraint=args.constraint, exclusive=args.exclusive, mail_user=args.mail_user, mail_type=args.mail_type,
        cpus_per_task=args.cpus_per_task, mem=args.mem, job_name=args.job_name, cpu=True if args.cpu else None,
        launcher=args.launcher, max_restarts=args.max_restarts, signal_s=args.signal_seconds, array=array,
        env=args.env, sbatch_args=args.sbatch_arg, dry_run=args.dry_run, wait=args.wait,
        force=getattr(args, "force", False), gpu_memory=getattr(args, "gpu_memory", "80GB"))


def cmd_launch(args) -> None:
    from moe.config import ConfigError
    from moe.launch import LaunchError, launch

    opts = _launch_options(args, args.config, args.overrides, local=args.local, array=args.array)
    try:
        code = launch(opts, sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "launch" else [])
    except (ConfigError, LaunchError) as exc:
        die(str(exc))
    sys.exit(code)


def cmd_match(args) -> None:
    from moe.config import ConfigError, load_config, to_yaml
    from moe.tools.match import match_dense

    try:
        cfg = load_config(args.config, args.overrides)
        dense, info = match_dense(cfg, args.on)
    except (ConfigError, ValueError) as exc:
        die(str(exc))
    text = to_yaml(dense)
    print(f"# dense model matched on {args.on} parameters to {args.config}: ffn_hidden={info['ffn_hidden']}, "
          f"{info['dense']:,} vs MoE {info['target']:,} ({100 * info['rel_diff']:+.2f}%)", file=sys.stderr)
    if args.out:
        # a small layered file: the MoE config with only what the match changes, so the pair
        # follows any later edit of the MoE file (re-run `moe match` if its shape changes)
        import yaml

        parent = os.path.relpath(os.path.abspath(args.config), os.path.dirname(os.path.abspath(args.out)))
        layered = {"defaults": [parent], "run": {"name": dense.run.name},
                   "model": {"ffn_hidden": info["ffn_hidden"], "moe": {"num_experts": 0}},
                   "logging": {"wandb": {"tags": list(dense.logging.wandb.tags)}}}
        if cfg.parallel.ep_size != 1:  # a dense model has no experts to shard
            layered["parallel"] = {"ep_size": 1}
        with open(args.out, "w") as f:
            f.write(f"# generated by: moe match {args.config} --on {args.on} --out {args.out}\n"
                    f"# {args.on} params: dense {info['dense']:,} vs MoE {info['target']:,} "
                    f"({100 * info['rel_diff']:+.2f}%)\n")
            yaml.safe_dump(layered, f, sort_keys=False)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)


def cmd_plan(args) -> None:
    from moe.config import load_config
    from moe.train.plan import Layout, check_layout, estimate, parse_memory, report
    from moe.validate import validate

    # every input is checked before the model is counted; errors become one line in main()
    layout = Layout(nodes=args.nodes, gpus_per_node=args.gpus_per_node, memory=parse_memory(args.gpu_memory),
                    peak_tflops=args.peak_tflops, mfu=args.mfu, device=args.device)
    check_layout(layout)
    cfg = load_config(args.config, args.overrides)
    validate(cfg, layout.world)
    plan = estimate(cfg, layout, tokens=int(args.tokens) if args.tokens else None)
    print(report(plan, cfg.run.name))
    if args.json:
        from moe.io import atomic_write

        atomic_write(args.json, json.dumps(plan.to_dict(), indent=2) + "\n")
        print(f"\nwrote {args.json}")


def cmd_sweep(args) -> None:
    import yaml

    from moe.config import ConfigError
    from moe.tools.sweep import load_sweep, run_local, wandb_sweep_config

    try:
        # every run is validated for the world it will train in before anything starts
        sweep = load_sweep(args.sweep, runs_root=args.root,
                           world_size=args.nodes * args.gpus_per_node if args.slurm else 1)
    except ConfigError as exc:
        die(str(exc))
    if args.export_wandb:
        if _has_variants(args.sweep):
            print("note: `variants` are exported as independent value lists; W&B's grid crosses them", file=sys.stderr)
        out = args.export_wandb
        with open(out, "w") as f:
            yaml.safe_dump(wandb_sweep_config(sweep), f, sort_keys=False)
        print(f"wrote {out}; start it with: wandb sweep {out} && wandb agent <sweep id>")
        return
    print(f"[sweep] {sweep.name}: {len(sweep.runs)} runs under {sweep.root}")
    if args.parallel < 0:
        die(f"--parallel must be >= 1, got {args.parallel}")
    if args.slurm:
        _sweep_slurm(args, sweep)
        return
    given = [f"--{a.dest.replace('_', '-')}" for a in args.slurm_actions if getattr(args, a.dest) != a.default]
    if given:
        die(f"{', '.join(given)}: Slurm job option(s) without --slurm; add --slurm to submit the sweep as a job array")
    if args.dry_run:
        for run in sweep.runs:
            print(f"  {run.name}: moe train {sweep.base} {' '.join(run.args)}")
        return
    _sweep_outcome(sweep, run_local(sweep, parallel=args.parallel or 1, threads=args.threads))


def _sweep_slurm(args, sweep) -> None:
    from moe.config import ConfigError
    from moe.launch import LaunchError
    from moe.tools.sweep import submit_slurm

    opts = _launch_options(args, sweep.base, sweep.common)
    argv = sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "sweep" else [args.sweep, "--slurm"]
    try:
        results = submit_slurm(sweep, opts, ["moe", "sweep", *argv], throttle=args.parallel or None)
    except (ConfigError, LaunchError) as exc:
        die(str(exc))
    if args.wait:
        _sweep_outcome(sweep, results)


def _sweep_outcome(sweep, results) -> None:
    """Print how the sweep's runs ended and the report command; exit 1 if any failed."""
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    queued = sum(r["status"] == "submitted" for r in results.values())
    print(f"[sweep] {sum(r['status'] == 'finished' for r in results.values())} finished, {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else "") + (f"; {queued} still in Slurm" if queued else ""))
    print(f"[sweep] report: moe report {sweep.root} --out {sweep.root}/report")
    if failed:
        sys.exit(1)


def _has_variants(path: str) -> bool:
    import yaml

    with open(path) as f:
        return bool((yaml.safe_load(f) or {}).get("variants"))


def cmd_report(args) -> None:
    from moe.analysis.compare import ReportError
    from moe.analysis.sweep_report import build_report

    try:
        text = build_report(args.dirs, args.out, wandb_summary=args.wandb)
    except ReportError as exc:
        die(str(exc))
    print(text.split("## Plots")[0])
    print(f"report.md and plots written to {args.out}")


def cmd_bench(args) -> None:
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.isfile(os.path.join(repo, "benchmarks", f"{args.which}.py")):
        die(f"benchmarks/{args.which}.py not found: `moe bench` runs from a source checkout (pip install -e .)")
    cmd = [sys.executable, "-m", f"benchmarks.{args.which}", *args.rest]
    sys.exit(subprocess.call(cmd, cwd=repo, env=dict(os.environ, PYTHONPATH=repo)))


def cmd_parity(args) -> None:
    from moe.tools.parity import main_parity

    sys.exit(main_parity(args))


def cmd_ckpt_verify(args) -> None:
    from moe.train.checkpoint.integrity import resolve_step_dir, verify

    try:
        path = resolve_step_dir(args.dir)
    except (FileNotFoundError, RuntimeError) as exc:
        die(str(exc))
    problems = verify(path)
    if problems:
        print(f"{path}: {len(problems)} problems", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        sys.exit(1)
    meta = json.load(open(os.path.join(path, "meta.json")))
    experts = ", ".join(f"{layer}: {info['num_experts']}" for layer, info in meta["experts"].items())
    print(f"{path}: OK (step {meta['step']}, {len(meta['tensors'])} non-expert tensors, experts per layer "
          f"{{{experts}}}, saved at ep_size={meta['saved_with']['ep_size']} in {meta['expert_shards']} shards)")


def cmd_ckpt_export(args) -> None:
    from moe.errors import CheckpointError
    from moe.train.checkpoint.loading import export

    try:
        info = export(args.dir, args.out)
    except (FileNotFoundError, RuntimeError, CheckpointError) as exc:
        die(str(exc))
    print(f"wrote {args.out}: {info['tensors']} tensors, {info['params']:,} parameters (step {info['step']})")


def cmd_export(args) -> None:
    from moe.tools.hf_export import export_hf

    info = export_hf(args.dir, args.hf)  # errors (ConfigError, CheckpointError, OSError) become one line in main()
    print(f"wrote {args.hf}: {info['architecture']}, {info['tensors']} tensors, tokenizer {info['tokenizer']}, "
          f"from {info['step_dir']}")


def cmd_info(args) -> None:
    import platform

    import torch

    from moe import ops

    rows = [("moe", __import__("moe").__version__), ("python", platform.python_version()),
            ("torch", torch.__version__)]
    import warnings

    for pkg in ("deepspeed", "megatron.core", "wandb", "datasets", "tokenizers"):
        try:
            with warnings.catch_warnings():  # e.g. megatron-core's four "Transformer Engine and Apex" notes
                warnings.simplefilter("ignore")
                mod = __import__(pkg, fromlist=["__version__"])
            rows.append((pkg, getattr(mod, "__version__", "?")))
        except Exception as exc:  # a broken optional install should not hide the rest
            rows.append((pkg, f"not importable ({type(exc).__name__})"))
    if torch.cuda.is_available():
        rows.append(("device", f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"))
        rows.append(("distributed backend", "nccl"))
    else:
        rows.append(("device", f"cpu ({torch.get_num_threads()} threads)"))
        rows.append(("distributed backend", "gloo"))
    kernels = ops.extension_devices()
    if not kernels:
        built = "compiled extension not built"
    elif torch.cuda.is_available() and "cuda" not in kernels:
        built = "moe._C has CPU kernels only (built without CUDA): CUDA tensors use the reference"
    else:
        built = f"moe._C has {' and '.join(k.upper() for k in kernels)} kernels"
    rows.append(("dispatch backend", f"{ops.dispatch_backend('auto')} ({built})"
                 + (" [forced by MOE_DISPATCH]" if os.environ.get("MOE_DISPATCH") else "")))
    from moe.nn.experts import describe_auto_impl

    rows.append(("expert backend", describe_auto_impl(
        torch.device("cuda" if torch.cuda.is_available() else "cpu"), ops.dispatch_backend("auto"))
        + " [model.moe.experts_impl=auto]"))
    from moe.train.host_memory import can_keep_freed_memory

    rows.append(("host memory", "training keeps freed memory for reuse (train.keep_freed_memory)"
                 if can_keep_freed_memory() else "the system allocator's default (train.keep_freed_memory needs glibc)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def cmd_data_prepare(args) -> None:
    from moe.data.prepare import default_out, load_data_config, prepare

    cfg = load_data_config(args.config, args.overrides)
    out = args.out or default_out(cfg)
    m = prepare(cfg, out, workers=args.workers, shard_bytes=max(1, int(args.shard_mb * 2**20)),
                progress=not args.no_progress)
    call = m["last_call"]
    if call["workers"] == 0:
        print(f"{out}: already prepared")
    else:
        print(f"{out}: {call['new_tokens']:,} tokens tokenized in {call['seconds']:.1f} s "
              f"({call['tokens_per_s']:,.0f} tokens/s, {call['workers']} workers)")
    print(f"  {m['documents']:,} documents, {m['tokens']:,} tokens ({m['train']['tokens']:,} train, "
          f"{m['val']['tokens']:,} val), {m['bytes']:,} bytes of text, {len(m['shards'])} shards, "
          f"tokenizer {m['tokenizer']['name']} (vocab {m['tokenizer']['vocab_size']})")
    print(f"  train on it with data.dataset={out} data.tokenizer={cfg.tokenizer}")
