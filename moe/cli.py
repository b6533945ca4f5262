"""`moe` command line: train | compare | generate | eval | match | sweep | report | launch | bench | parity | ckpt |
info."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, NoReturn, Optional

os.environ.setdefault("WANDB_SILENT", "true")


def _die(msg: str) -> NoReturn:
    if _debug() and sys.exc_info()[1] is not None:
        raise  # MOE_DEBUG=1: the traceback of the error being handled, instead of the one line
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def cmd_train(args) -> None:
    from moe.config import ConfigError, load_config
    from moe.train.loop import train

    overrides = list(args.overrides)
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID") and \
            not any(o.startswith("run.name=") for o in overrides):
        # started by `wandb agent`: each agent run needs its own run folder
        stem = os.path.splitext(os.path.basename(args.config))[0]
        overrides.append(f"run.name={stem}-{os.environ['WANDB_RUN_ID']}")
    try:
        cfg = load_config(args.config, overrides)
        train(cfg)
    except ConfigError as exc:
        _die(str(exc))
    except FileNotFoundError as exc:
        _die(str(exc))


def cmd_compare(args) -> None:
    from moe.analysis.compare import ReportError, compare_runs

    try:
        table = compare_runs(args.runs, args.out)
    except ReportError as exc:
        _die(str(exc))
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
        _die(str(exc))
    print(args.prompt + tok.decode(ids))


def cmd_eval(args) -> None:
    from moe.data import tokenize_file_for_eval
    from moe.tools.inference import evaluate_dataset, load_run

    try:
        model, tok, cfg = load_run(args.run_dir, args.tag)
        dataset = tokenize_file_for_eval(args.data, tok, cfg.data.cache_dir, cfg.data.text_field)
        seq_len = args.seq_len or cfg.train.seq_len
        result = evaluate_dataset(model, dataset, seq_len, args.batch_size, args.max_batches)
    except (FileNotFoundError, ValueError) as exc:
        _die(str(exc))
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
        env=args.env, sbatch_args=args.sbatch_arg, dry_run=args.dry_run, wait=args.wait)


def cmd_launch(args) -> None:
    from moe.config import ConfigError
    from moe.launch import LaunchError, launch

    opts = _launch_options(args, args.config, args.overrides, local=args.local, array=args.array)
    try:
        code = launch(opts, sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "launch" else [])
    except (ConfigError, LaunchError) as exc:
        _die(str(exc))
    sys.exit(code)


def cmd_match(args) -> None:
    from moe.config import ConfigError, load_config, to_yaml
    from moe.tools.match import match_dense

    try:
        cfg = load_config(args.config, args.overrides)
        dense, info = match_dense(cfg, args.on)
    except (ConfigError, ValueError) as exc:
        _die(str(exc))
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
        with open(args.out, "w") as f:
            f.write(f"# generated by: moe match {args.config} --on {args.on} --out {args.out}\n"
                    f"# {args.on} params: dense {info['dense']:,} vs MoE {info['target']:,} "
                    f"({100 * info['rel_diff']:+.2f}%)\n")
            yaml.safe_dump(layered, f, sort_keys=False)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)


def cmd_sweep(args) -> None:
    import yaml

    from moe.config import ConfigError
    from moe.tools.sweep import load_sweep, run_local, wandb_sweep_config

    try:
        # every run is validated for the world it will train in before anything starts
        sweep = load_sweep(args.sweep, runs_root=args.root,
                           world_size=args.nodes * args.gpus_per_node if args.slurm else 1)
    except ConfigError as exc:
        _die(str(exc))
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
        _die(f"--parallel must be >= 1, got {args.parallel}")
    if args.slurm:
        _sweep_slurm(args, sweep)
        return
    given = [f"--{a.dest.replace('_', '-')}" for a in args.slurm_actions if getattr(args, a.dest) != a.default]
    if given:
        _die(f"{', '.join(given)}: Slurm job option(s) without --slurm; add --slurm to submit the sweep as a job array")
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
        _die(str(exc))
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
        _die(str(exc))
    print(text.split("## Plots")[0])
    print(f"report.md and plots written to {args.out}")


def cmd_bench(args) -> None:
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(repo, "benchmarks", f"{args.which}.py")):
        _die(f"benchmarks/{args.which}.py not found: `moe bench` runs from a source checkout (pip install -e .)")
    cmd = [sys.executable, "-m", f"benchmarks.{args.which}", *args.rest]
    sys.exit(subprocess.call(cmd, cwd=repo, env=dict(os.environ, PYTHONPATH=repo)))


def cmd_parity(args) -> None:
    from moe.tools.parity import main_parity

    sys.exit(main_parity(args))


def cmd_ckpt_verify(args) -> None:
    from moe.train.checkpoint import resolve_step_dir, verify

    try:
        path = resolve_step_dir(args.dir)
    except (FileNotFoundError, RuntimeError) as exc:
        _die(str(exc))
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
    from moe.train.checkpoint import CheckpointError, export

    try:
        info = export(args.dir, args.out)
    except (FileNotFoundError, RuntimeError, CheckpointError) as exc:
        _die(str(exc))
    print(f"wrote {args.out}: {info['tensors']} tensors, {info['params']:,} parameters (step {info['step']})")


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


def _add_slurm_options(parser) -> List[argparse.Action]:
    """The job options shared by `moe launch` and `moe sweep --slurm`; returns their actions."""
    actions: List[argparse.Action] = []

    def add(*flags, **kw) -> None:
        actions.append(parser.add_argument(*flags, **kw))

    add("--nodes", type=int, default=1, help="nodes to allocate per run (default 1)")
    add("--gpus-per-node", type=int, default=1,
        help="processes per node: one per GPU on GPU nodes; on CPU-only nodes (the partition has no "
             "GPU GRES, or --cpu) the number of CPU processes per node, and no GPU is requested")
    add("--cpu", action="store_true", help="the nodes have no GPU: request none")
    add("--launcher", choices=("torchrun", "deepspeed"), default="torchrun",
        help="torchrun (c10d rendezvous, restarts) or the deepspeed launcher with a hostfile")
    add("--max-restarts", type=int, default=0,
        help="torchrun restarts of failed workers; each restart resumes from the latest checkpoint")
    add("--signal-seconds", type=int, default=120,
        help="USR2 this many seconds before the time limit: checkpoint, requeue, exit (default 120)")
    for flag in ("partition", "account", "qos", "time", "constraint", "mem", "mail-user", "mail-type", "job-name"):
        add(f"--{flag}", help=f"sbatch --{flag}")
    add("--exclusive", action="store_true", help="sbatch --exclusive")
    add("--cpus-per-task", type=int, default=0, help="CPUs for each node's launcher and its workers")
    add("--env", action="append", default=[], metavar="NAME=VALUE",
        help="export this in the job script (not for secrets: those are inherited at run time)")
    add("--sbatch-arg", action="append", default=[], metavar="ARG",
        help="extra #SBATCH line, e.g. --sbatch-arg=--reservation=foo")
    add("--wait", action="store_true", help="wait for the job (and its requeues) to end")
    return actions


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `moe launch --local N` must not read as an abbreviation of --local_rank
    p = argparse.ArgumentParser(prog="moe", description="Train and compare dense and MoE GPT models.",
                                allow_abbrev=False)
    # the deepspeed launcher passes --local_rank=N before the subcommand
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a run: moe train CONFIG [key=value ...]")
    t.add_argument("config", help="YAML file, e.g. experiments/quickstart_moe.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layers=4 train.steps=200")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compare", help="plots and a table comparing run folders")
    c.add_argument("runs", nargs="+", help="run folders (runs/<name>)")
    c.add_argument("--out", required=True, help="output folder for PNGs and compare.md")
    c.set_defaults(func=cmd_compare)

    g = sub.add_parser("generate", help="sample text from a run's latest checkpoint")
    g.add_argument("run_dir")
    g.add_argument("--prompt", required=True, help="text to continue (not empty)")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add, >= 1 (default 200)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy, else >= 1e-6 (default 0.8)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens; 0 = off (default)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus mass in (0, 1]; 1 = off (default 0.95)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed, >= 0 (default 0)")
    g.add_argument("--tag", default=None, help="checkpoint folder name (default: latest)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="loss and perplexity of a run's checkpoint on a text file or dataset")
    e.add_argument("run_dir")
    e.add_argument("--data", required=True, help="text/json/jsonl/parquet file or folder, or a hub dataset name")
    e.add_argument("--seq-len", type=int, default=0, help="window length (default: the run's train.seq_len)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-batches", type=int, default=0, help="0 = the whole file")
    e.add_argument("--tag", default=None)
    e.set_defaults(func=cmd_eval)

    la = sub.add_parser(
        "launch", help="submit a run to Slurm (or run it here with --local N)",
        description="Validate the config for the job's world size, write runs/<name>/ (config.yaml, submit.sbatch, "
                    "a code snapshot), submit with sbatch and print the job id and log paths. The job resumes "
                    "from the latest checkpoint on every start; on USR2 (sent --signal-seconds before the time "
                    "limit) it checkpoints, requeues itself and exits. Secrets stay in the environment.")
    la.add_argument("config", help="YAML file, e.g. experiments/base_small.yaml")
    la.add_argument("overrides", nargs="*", help="dotted overrides; with --array, {task} is the array task id")
    _add_slurm_options(la)
    la.add_argument("--local", type=int, default=0, metavar="N",
                    help="no Slurm: run here with torchrun --standalone and N processes, in the foreground")
    la.add_argument("--array", metavar="SPEC", help="job array in Slurm's syntax (0-7, 0-7%%2, 1,3,5): one run per "
                                                    "task, named <name>_<id>")
    la.add_argument("--dry-run", action="store_true", help="print the job script; write and submit nothing")
    la.set_defaults(func=cmd_launch)

    m = sub.add_parser("match", help="derive the dense config matched to an MoE config on active or total params")
    m.add_argument("config")
    m.add_argument("overrides", nargs="*")
    m.add_argument("--on", choices=["active", "total"], default="active")
    m.add_argument("--out", default=None, help="write the YAML here (default: stdout)")
    m.set_defaults(func=cmd_match)

    s = sub.add_parser(
        "sweep", help="run a sweep file (grid/variants/seeds) here, or submit it as one Slurm job array",
        description="Run every run of the sweep that is not finished: on this machine (--parallel at a time), or "
                    "with --slurm as one Slurm job array through `moe launch` (task i trains run i; the job options "
                    "below apply to every run). Finished runs, and runs an earlier array still has queued or "
                    "running, are skipped; unfinished ones resume from their latest checkpoint.")
    s.add_argument("sweep", help="sweep YAML, e.g. experiments/sweeps/topk.yaml")
    s.add_argument("--parallel", type=int, default=0,
                   help="runs at a time: on this machine (default 1), or with --slurm the array's %%N throttle "
                        "(default: no limit)")
    s.add_argument("--threads", type=int, default=0, help="torch threads per local run (default: cores / parallel)")
    s.add_argument("--root", default="runs", help="parent folder of the sweep folder")
    s.add_argument("--dry-run", action="store_true",
                   help="list the runs and their commands (with --slurm: print the array job script); run nothing")
    s.add_argument("--export-wandb", metavar="OUT", default=None, help="write a W&B sweep config instead")
    s.add_argument("--slurm", action="store_true", help="submit the runs as one Slurm job array (options below)")
    s.set_defaults(slurm_actions=_add_slurm_options(s.add_argument_group("Slurm job options (with --slurm)")))
    s.set_defaults(func=cmd_sweep)

    r = sub.add_parser("report", help="group sweep runs by swept values, average seeds, plot and tabulate")
    r.add_argument("dirs", nargs="+", help="sweep folders (with sweep.json) or run folders")
    r.add_argument("--out", required=True)
    r.add_argument("--wandb", action="store_true", help="also log the table and plots to a W&B summary run")
    r.set_defaults(func=cmd_report)

    b = sub.add_parser("bench", help="run a benchmark: dispatch | layer | train (and others in benchmarks/)")
    b.add_argument("which", help="benchmark name: dispatch, layer, train, ...")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="its own flags, e.g. --json out.json")
    b.set_defaults(func=cmd_bench)

    pa = sub.add_parser(
        "parity", help="run a config at several parallel layouts on the same batches and compare them",
        description="Launch each layout as processes on this machine (torchrun --standalone), run N steps on "
                    "the same global batches, print per step the loss, aux and z losses, grad norm and per-expert "
                    "token counts with their differences to the first layout, and exit 1 above --tolerance. A "
                    "layout is key=value[,key=value]: ep (parallel.ep_size), nproc, zero (train.zero_stage), mbs "
                    "(train.micro_batch_size) or any dotted config key.")
    pa.add_argument("config")
    pa.add_argument("overrides", nargs="*", help="dotted overrides applied to every layout")
    pa.add_argument("--layouts", nargs="+", required=True, metavar="LAYOUT", help='e.g. "ep=1" "ep=2" "ep=2,zero=1"')
    pa.add_argument("--steps", type=int, default=5)
    pa.add_argument("--nproc", type=int, default=None, help="processes per layout (default: the largest ep)")
    pa.add_argument("--tolerance", type=float, default=1e-5, help="largest relative difference (default 1e-5)")
    pa.add_argument("--keep", default=None, metavar="DIR", help="keep each layout's records and logs here")
    pa.add_argument("--dump", action="store_true", help="with --keep: also save logits, gradients and final weights")
    pa.set_defaults(func=cmd_parity)

    ck = sub.add_parser("ckpt", help="inspect checkpoints: verify, export")
    cks = ck.add_subparsers(dest="ckpt_command", required=True)
    cv = cks.add_parser("verify", help="check that every expert of every layer is present exactly once")
    cv.add_argument("dir", help="a step folder, a checkpoints folder or a run folder (latest)")
    cv.set_defaults(func=cmd_ckpt_verify)
    ce = cks.add_parser("export", help="write one consolidated safetensors file with the EP=1 names")
    ce.add_argument("dir", help="a step folder, a checkpoints folder or a run folder (latest)")
    ce.add_argument("out", help="output .safetensors file")
    ce.set_defaults(func=cmd_ckpt_export)

    i = sub.add_parser("info", help="versions, device, distributed and dispatch backends")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[List[str]] = None) -> None:
    """Every failure a user can cause ends as one `error:` line naming the key, file or value, exit 2;
    MOE_DEBUG=1 shows the traceback instead."""
    args = build_parser().parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        args.func(args)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if _debug():
            raise
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001  (the one place every failure is turned into a message)
        if _debug():
            raise
        _die(describe_error(exc))


def _debug() -> bool:
    return os.environ.get("MOE_DEBUG", "") not in ("", "0")


def describe_error(exc: BaseException) -> str:
    """One line for any exception: our own errors say what they say; OS errors name the path
    (ENOSPC: the disk is full); anything else is named as unexpected."""
    import errno

    from moe.errors import MoeError

    if isinstance(exc, MoeError):
        return str(exc).strip().replace("\n", " ")
    if isinstance(exc, OSError):
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)
        what = exc.strerror or str(exc)
        if exc.errno == errno.ENOSPC:
            what = "no space left on the device (disk full)"
        return f"{where}: {what}" if where else what
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text} (unexpected; MOE_DEBUG=1 shows the traceback)"


if __name__ == "__main__":
    main()
