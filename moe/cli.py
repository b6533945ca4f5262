"""`moe` command line: train | compare | generate | eval | info."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

os.environ.setdefault("WANDB_SILENT", "true")


def _die(msg: str) -> "NoReturn":  # noqa: F821
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def cmd_train(args) -> None:
    from moe.config import ConfigError, load_config
    from moe.train import train

    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except ConfigError as exc:
        _die(str(exc))
    except FileNotFoundError as exc:
        _die(str(exc))


def cmd_compare(args) -> None:
    from moe.report import ReportError, compare_runs

    try:
        table = compare_runs(args.runs, args.out)
    except ReportError as exc:
        _die(str(exc))
    print(table)
    print(f"\nplots and compare.md written to {args.out}")


def cmd_generate(args) -> None:
    from moe.inference import generate, load_run

    try:
        model, tok, _ = load_run(args.run_dir, args.tag)
    except FileNotFoundError as exc:
        _die(str(exc))
    ids = generate(model, tok.encode(args.prompt), args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                   args.seed, eos_id=tok.eos_id)
    print(args.prompt + tok.decode(ids))


def cmd_eval(args) -> None:
    from moe.data import tokenize_file_for_eval
    from moe.inference import evaluate_dataset, load_run

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


def cmd_info(args) -> None:
    import platform

    import torch

    from moe import ops

    rows = [("moe", __import__("moe").__version__), ("python", platform.python_version()),
            ("torch", torch.__version__)]
    for pkg in ("deepspeed", "megatron.core", "wandb", "datasets", "tokenizers"):
        try:
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
    rows.append(("dispatch backend", ops.dispatch_backend("auto")
                 + ("" if ops.extension_available() else " (compiled extension not built)")
                 + (" [forced by MOE_DISPATCH]" if os.environ.get("MOE_DISPATCH") else "")))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe", description="Train and compare dense and MoE GPT models.")
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
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
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

    i = sub.add_parser("info", help="versions, device, distributed and dispatch backends")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    args.func(args)


if __name__ == "__main__":
    main()
