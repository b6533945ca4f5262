"""The argument parser of `moe`: one function per command, each naming the function that runs it
(moe/cli/commands.py)."""
from __future__ import annotations

import argparse
from typing import List

from moe.cli import commands


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `moe launch --local N` must not read as an abbreviation of --local_rank
    p = argparse.ArgumentParser(prog="moe", description="Train and compare dense and MoE GPT models.",
                                allow_abbrev=False)
    # the deepspeed launcher passes --local_rank=N before the subcommand
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_compare, _add_generate, _add_eval, _add_launch, _add_match, _add_sweep, _add_report,
                _add_bench, _add_parity, _add_ckpt, _add_export, _add_info, _add_data, _add_plan):
        add(sub)
    return p


def add_slurm_options(parser) -> List[argparse.Action]:
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
    add("--gpu-memory", default="80GB", help="memory of one GPU for the plan's fit check (default 80GB)")
    add("--force", action="store_true", help="submit even when `moe plan` says a run does not fit")
    return actions


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train (or resume) a run: moe train CONFIG [key=value ...]")
    t.add_argument("config", help="YAML file, e.g. experiments/quickstart_moe.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layers=4 train.steps=200")
    t.set_defaults(func=commands.cmd_train)


def _add_compare(sub) -> None:
    c = sub.add_parser("compare", help="plots and a table comparing run folders")
    c.add_argument("runs", nargs="+", help="run folders (runs/<name>)")
    c.add_argument("--out", required=True, help="output folder for PNGs and compare.md")
    c.set_defaults(func=commands.cmd_compare)


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="sample text from a run's latest checkpoint")
    g.add_argument("run_dir")
    g.add_argument("--prompt", required=True, help="text to continue (not empty)")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add, >= 1 (default 200)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy, else >= 1e-6 (default 0.8)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens; 0 = off (default)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus mass in (0, 1]; 1 = off (default 0.95)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed, >= 0 (default 0)")
    g.add_argument("--tag", default=None, help="checkpoint folder name (default: latest)")
    g.set_defaults(func=commands.cmd_generate)


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="loss and perplexity of a run's checkpoint on a text file or dataset, or "
                                    "lm-eval-harness tasks (--tasks)")
    e.add_argument("run_dir")
    what = e.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="text/json/jsonl/parquet file or folder, or a hub dataset name")
    what.add_argument("--tasks", help="comma-separated lm-eval task, group or tag names, or task YAML files "
                                      "(needs pip install moe[eval])")
    e.add_argument("--include-path", default="", help="with --tasks: a folder of task YAML files, searched first")
    e.add_argument("--limit", type=float, default=None, help="with --tasks: at most N documents per task "
                                                             "(below 1: a fraction)")
    e.add_argument("--num-fewshot", type=int, default=None, help="with --tasks: few-shot examples (default: "
                                                                 "each task's own)")
    e.add_argument("--out", default=None, help="with --tasks: write the results as JSON to this file")
    e.add_argument("--seq-len", type=int, default=0, help="window length (default: the run's train.seq_len)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-batches", type=int, default=0, help="0 = the whole file")
    e.add_argument("--tag", default=None)
    e.set_defaults(func=commands.cmd_eval)


def _add_launch(sub) -> None:
    la = sub.add_parser(
        "launch", help="submit a run to Slurm (or run it here with --local N)",
        description="Validate the config for the job's world size, write runs/<name>/ (config.yaml, submit.sbatch, "
                    "a code snapshot), submit with sbatch and print the job id and log paths. The job resumes "
                    "from the latest checkpoint on every start; on USR2 (sent --signal-seconds before the time "
                    "limit) it checkpoints, requeues itself and exits. Secrets stay in the environment.")
    la.add_argument("config", help="YAML file, e.g. experiments/base_small.yaml")
    la.add_argument("overrides", nargs="*", help="dotted overrides; with --array, {task} is the array task id")
    add_slurm_options(la)
    la.add_argument("--local", type=int, default=0, metavar="N",
                    help="no Slurm: run here with torchrun --standalone and N processes, in the foreground")
    la.add_argument("--array", metavar="SPEC", help="job array in Slurm's syntax (0-7, 0-7%%2, 1,3,5): one run per "
                                                    "task, named <name>_<id>")
    la.add_argument("--dry-run", action="store_true", help="print the job script; write and submit nothing")
    la.set_defaults(func=commands.cmd_launch)


def _add_match(sub) -> None:
    m = sub.add_parser("match", help="derive the dense config matched to an MoE config on active or total params")
    m.add_argument("config")
    m.add_argument("overrides", nargs="*")
    m.add_argument("--on", choices=["active", "total"], default="active")
    m.add_argument("--out", default=None, help="write the YAML here (default: stdout)")
    m.set_defaults(func=commands.cmd_match)


def _add_plan(sub) -> None:
    pl = sub.add_parser(
        "plan", help="will a run fit, and how long will it take: sizes, memory per GPU by term, a verdict",
        description="Parameters (total, active, embedding) and training FLOPs per token, counted on the meta device; "
                    "per-GPU memory by term (weights, gradients, optimizer states by ZeRO stage and expert-parallel "
                    "size, activations by micro-batch and train.recompute, dispatch and exchange buffers, a fixed "
                    "overhead); fits or not, with the knobs that make it fit; tokens/s and the time to train at "
                    "--mfu. See moe/train/plan.py.")
    pl.add_argument("config", help="YAML file, e.g. experiments/presets/moe_125m.yaml")
    pl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.ep_size=8 train.zero_stage=2")
    pl.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    pl.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node (default 8)")
    pl.add_argument("--gpu-memory", default="80GB", help="memory of one GPU: 80GB (1e9 bytes), 96GiB, ... (default 80GB)")
    pl.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one GPU (default 989: H100 SXM)")
    pl.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the time estimate (default 0.4)")
    pl.add_argument("--tokens", type=float, default=None,
                    help="tokens to train (default: train.steps x global batch x seq_len)")
    pl.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cuda (default) or cpu: host memory per process, fp32, no fit check")
    pl.add_argument("--json", metavar="OUT", default=None, help="also write the plan as JSON")
    pl.set_defaults(func=commands.cmd_plan)


def _add_sweep(sub) -> None:
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
    s.set_defaults(slurm_actions=add_slurm_options(s.add_argument_group("Slurm job options (with --slurm)")))
    s.set_defaults(func=commands.cmd_sweep)


def _add_report(sub) -> None:
    r = sub.add_parser("report", help="group sweep runs by swept values, average seeds, plot and tabulate")
    r.add_argument("dirs", nargs="+", help="sweep folders (with sweep.json) or run folders")
    r.add_argument("--out", required=True)
    r.add_argument("--wandb", action="store_true", help="also log the table and plots to a W&B summary run")
    r.set_defaults(func=commands.cmd_report)


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="run a benchmark: dispatch | layer | train (and others in benchmarks/)")
    b.add_argument("which", help="benchmark name: dispatch, layer, train, ...")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="its own flags, e.g. --json out.json")
    b.set_defaults(func=commands.cmd_bench)


def _add_parity(sub) -> None:
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
    pa.set_defaults(func=commands.cmd_parity)


def _add_ckpt(sub) -> None:
    ck = sub.add_parser("ckpt", help="inspect checkpoints: verify, export")
    cks = ck.add_subparsers(dest="ckpt_command", required=True)
    cv = cks.add_parser("verify", help="check that every expert of every layer is present exactly once")
    cv.add_argument("dir", help="a step folder, a checkpoints folder or a run folder (latest)")
    cv.set_defaults(func=commands.cmd_ckpt_verify)
    ce = cks.add_parser("export", help="write one consolidated safetensors file with the EP=1 names")
    ce.add_argument("dir", help="a step folder, a checkpoints folder or a run folder (latest)")
    ce.add_argument("out", help="output .safetensors file")
    ce.set_defaults(func=commands.cmd_ckpt_export)


def _add_export(sub) -> None:
    ex = sub.add_parser("export", help="write a checkpoint as a Hugging Face transformers model folder",
                        description="Llama or Qwen3 for a dense model; Mixtral, OLMoE or Qwen3-MoE for an MoE model "
                                    "(chosen from the model's features; a model none of them computes is refused). "
                                    "Needs transformers (pip install moe[hf]).")
    ex.add_argument("dir", help="a step folder, a checkpoints folder or a run folder (latest)")
    ex.add_argument("--hf", required=True, metavar="OUT", help="output folder (new or empty)")
    ex.set_defaults(func=commands.cmd_export)


def _add_info(sub) -> None:
    i = sub.add_parser("info", help="versions, device, distributed and dispatch backends")
    i.set_defaults(func=commands.cmd_info)


def _add_data(sub) -> None:
    d = sub.add_parser("data", help="prepare datasets: tokenize once, outside training")
    ds = d.add_subparsers(dest="data_command", required=True)
    pr = ds.add_parser("prepare", help="tokenize a corpus with N worker processes into a prepared folder that "
                                       "`moe train` reads with data.dataset=FOLDER")
    pr.add_argument("config", help="DATA.yaml (the data keys alone: dataset, tokenizer, ...) or a run config")
    pr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_bytes=1e8")
    pr.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    pr.add_argument("--out", default=None,
                    help="prepared folder (default <data.cache_dir>/prepared/<corpus>-<tokenizer>-<hash>); "
                         "rerun with the same --out to resume a killed prepare")
    pr.add_argument("--shard-mb", type=float, default=16.0, help="text per shard in MB (default 16)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.set_defaults(func=commands.cmd_data_prepare)
