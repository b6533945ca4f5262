"""moe/cli/parser.py: every command and sub-command of `moe` parses the flags the README and its help
document, with their defaults, and names the `commands.cmd_*` function that runs it."""
import argparse
import subprocess
import sys

import pytest

import moe.cli
from moe.cli import commands
from moe.cli.parser import build_parser


def parse(*argv):
    return build_parser().parse_args(list(argv))


def refused(capsys, *argv) -> str:
    """argparse refuses argv with exit 2; its message (stderr)."""
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def subcommands(parser) -> dict:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_the_commands_are_those_the_cli_docstring_lists():
    listed = moe.cli.__doc__.split(":", 1)[1].split(".")[0]
    names = [n.strip() for n in listed.replace("\n", " ").split("|")]
    assert sorted(subcommands(build_parser())) == sorted(names)
    assert sorted(subcommands(subcommands(build_parser())["ckpt"])) == ["export", "verify"]


def test_every_cmd_function_is_reachable_from_exactly_one_command():
    funcs = []
    for name, sub in subcommands(build_parser()).items():
        if name in ("ckpt", "data"):
            funcs += [s.get_default("func") for s in subcommands(sub).values()]
        else:
            funcs.append(sub.get_default("func"))
    cmd_functions = [getattr(commands, n) for n in dir(commands) if n.startswith("cmd_")]
    assert sorted(f.__name__ for f in funcs) == sorted(f.__name__ for f in cmd_functions)
    assert all(f is getattr(commands, f.__name__) for f in funcs)


def test_train_takes_a_config_and_dotted_overrides():
    a = parse("train", "experiments/quickstart_moe.yaml", "model.n_layers=4", "train.steps=200")
    assert a.func is commands.cmd_train and a.command == "train"
    assert a.config == "experiments/quickstart_moe.yaml"
    assert a.overrides == ["model.n_layers=4", "train.steps=200"]
    assert a.local_rank is None
    assert parse("train", "c.yaml").overrides == []


@pytest.mark.parametrize("argv,rank", [
    (["--local_rank=3", "train", "c.yaml", "a=1"], 3),  # how the deepspeed launcher passes it
    (["--local_rank", "0", "train", "c.yaml"], 0),
    (["--local-rank=2", "train", "c.yaml"], 2),  # torch.distributed.launch's newer spelling
])
def test_local_rank_before_the_subcommand(argv, rank):
    a = parse(*argv)
    assert a.local_rank == rank and a.func is commands.cmd_train and a.config == "c.yaml"


def test_local_rank_is_not_a_subcommand_flag_and_not_abbreviated(capsys):
    assert "unrecognized arguments: --local_rank=1" in refused(capsys, "train", "c.yaml", "--local_rank=1")
    # allow_abbrev=False: `--local` is not read as `--local_rank` at the top level
    assert "invalid choice: '2'" in refused(capsys, "--local", "2", "train", "c.yaml")


def test_compare():
    a = parse("compare", "runs/a", "runs/b", "--out", "cmp")
    assert a.func is commands.cmd_compare and a.runs == ["runs/a", "runs/b"] and a.out == "cmp"


def test_generate_flags_and_defaults():
    a = parse("generate", "runs/x", "--prompt", "def ")
    assert a.func is commands.cmd_generate and a.run_dir == "runs/x" and a.prompt == "def "
    assert (a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed, a.tag) == (200, 0.8, 0, 0.95, 0, None)
    a = parse("generate", "runs/x", "--prompt", "x", "--max-new-tokens", "5", "--temperature", "0", "--top-k", "3",
              "--top-p", "0.5", "--seed", "7", "--tag", "step_00000010")
    assert (a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed, a.tag) == (5, 0.0, 3, 0.5, 7, "step_00000010")


def test_eval_flags_and_defaults():
    a = parse("eval", "runs/x", "--data", "valid.jsonl")
    assert a.func is commands.cmd_eval and a.run_dir == "runs/x" and a.data == "valid.jsonl"
    assert (a.seq_len, a.batch_size, a.max_batches, a.tag) == (0, 8, 0, None)
    a = parse("eval", "runs/x", "--data", "d", "--seq-len", "64", "--batch-size", "2", "--max-batches", "3",
              "--tag", "t")
    assert (a.seq_len, a.batch_size, a.max_batches, a.tag) == (64, 2, 3, "t")


@pytest.mark.parametrize("argv,flag", [
    (["generate", "runs/x"], "--prompt"),
    (["compare", "runs/a"], "--out"),
    (["report", "runs/s"], "--out"),
    (["parity", "c.yaml"], "--layouts"),
])
def test_required_flags(capsys, argv, flag):
    assert f"the following arguments are required: {flag}" in refused(capsys, *argv)


def test_eval_needs_data_or_tasks(capsys):
    assert "one of the arguments --data --tasks is required" in refused(capsys, "eval", "runs/x")


@pytest.mark.parametrize("argv,text", [
    (["generate", "r", "--prompt", "x", "--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value"),
    (["generate", "r", "--prompt", "x", "--temperature", "hot"], "argument --temperature: invalid float value"),
    (["match", "c.yaml", "--on", "both"], "argument --on: invalid choice: 'both'"),
    (["launch", "c.yaml", "--launcher", "mpirun"], "argument --launcher: invalid choice: 'mpirun'"),
    (["launch", "c.yaml", "--local", "x"], "argument --local: invalid int value"),
    (["ckpt"], "the following arguments are required: ckpt_command"),
    (["data"], "the following arguments are required: data_command"),
    (["data", "prepare", "d.yaml", "--workers", "two"], "argument --workers: invalid int value"),
    (["ckpt", "verify"], "the following arguments are required: dir"),
    (["ckpt", "export", "d"], "the following arguments are required: out"),
    ([], "the following arguments are required: command"),
    (["fly"], "invalid choice: 'fly'"),
])
def test_bad_arguments_are_refused_by_argparse(capsys, argv, text):
    assert text in refused(capsys, *argv)


def test_launch_local_runs_here():
    a = parse("launch", "--local", "4", "experiments/debug_moe.yaml", "train.steps=3")
    assert a.func is commands.cmd_launch and a.local == 4 and a.local_rank is None
    assert a.config == "experiments/debug_moe.yaml" and a.overrides == ["train.steps=3"]
    assert parse("launch", "c.yaml", "--local", "2").local == 2
    assert parse("launch", "c.yaml").local == 0


def test_launch_job_options_and_defaults():
    a = parse("launch", "c.yaml")
    assert (a.nodes, a.gpus_per_node, a.cpu, a.launcher, a.max_restarts, a.signal_seconds) == \
        (1, 1, False, "torchrun", 0, 120)
    assert (a.partition, a.account, a.qos, a.time, a.constraint, a.mem, a.mail_user, a.mail_type, a.job_name) == \
        (None,) * 9
    assert (a.exclusive, a.cpus_per_task, a.env, a.sbatch_arg, a.wait, a.array, a.dry_run) == \
        (False, 0, [], [], False, None, False)
    a = parse("launch", "experiments/base_small.yaml", "parallel.ep_size=8", "--nodes", "2", "--gpus-per-node", "8",
              "--cpu", "--launcher", "deepspeed", "--max-restarts", "3", "--signal-seconds", "60",
              "--partition", "gpu", "--account", "acc", "--qos", "high", "--time", "4:00:00", "--constraint", "a100",
              "--mem", "100G", "--mail-user", "me@x", "--mail-type", "END", "--job-name", "j", "--exclusive",
              "--cpus-per-task", "16", "--env", "A=1", "--env", "B=2", "--sbatch-arg=--reservation=foo",
              "--wait", "--array", "0-7%2", "--dry-run")
    assert a.overrides == ["parallel.ep_size=8"]
    assert (a.nodes, a.gpus_per_node, a.cpu, a.launcher, a.max_restarts, a.signal_seconds) == \
        (2, 8, True, "deepspeed", 3, 60)
    assert (a.partition, a.account, a.qos, a.time, a.constraint, a.mem, a.mail_user, a.mail_type, a.job_name) == \
        ("gpu", "acc", "high", "4:00:00", "a100", "100G", "me@x", "END", "j")
    assert (a.exclusive, a.cpus_per_task, a.env, a.sbatch_arg, a.wait, a.array, a.dry_run) == \
        (True, 16, ["A=1", "B=2"], ["--reservation=foo"], True, "0-7%2", True)


def test_match():
    a = parse("match", "experiments/quickstart_moe.yaml", "model.n_layers=2")
    assert a.func is commands.cmd_match and a.overrides == ["model.n_layers=2"] and (a.on, a.out) == ("active", None)
    a = parse("match", "c.yaml", "--on", "total", "--out", "dense.yaml")
    assert (a.on, a.out) == ("total", "dense.yaml")


def test_sweep_flags_and_its_slurm_options():
    a = parse("sweep", "experiments/sweeps/topk.yaml")
    assert a.func is commands.cmd_sweep and a.sweep == "experiments/sweeps/topk.yaml"
    assert (a.parallel, a.threads, a.root, a.dry_run, a.export_wandb, a.slurm) == (0, 0, "runs", False, None, False)
    # the job options are moe launch's, listed so that `moe sweep` can refuse them without --slurm
    launch_dests = {act.dest for act in subcommands(build_parser())["launch"]._actions}
    slurm_dests = {act.dest for act in a.slurm_actions}
    assert {"nodes", "gpus_per_node", "partition", "time", "wait", "env", "sbatch_arg"} <= slurm_dests
    assert slurm_dests <= launch_dests and not slurm_dests & {"config", "overrides", "local", "array", "dry_run"}
    assert all(getattr(a, act.dest) == act.default for act in a.slurm_actions)
    a = parse("sweep", "s.yaml", "--parallel", "2", "--threads", "3", "--root", "out", "--dry-run",
              "--export-wandb", "w.yaml", "--slurm", "--nodes", "2", "--partition", "gpu", "--wait")
    assert (a.parallel, a.threads, a.root, a.dry_run, a.export_wandb, a.slurm) == (2, 3, "out", True, "w.yaml", True)
    assert (a.nodes, a.partition, a.wait) == (2, "gpu", True)


def test_report():
    a = parse("report", "runs/topk", "runs/zloss", "--out", "rep", "--wandb")
    assert a.func is commands.cmd_report and a.dirs == ["runs/topk", "runs/zloss"] and a.out == "rep" and a.wandb
    assert not parse("report", "runs/topk", "--out", "rep").wandb


def test_bench_passes_the_benchmarks_own_flags_through():
    a = parse("bench", "dispatch", "--json", "out.json", "--tokens", "4096")
    assert a.func is commands.cmd_bench and a.which == "dispatch"
    assert a.rest == ["--json", "out.json", "--tokens", "4096"]
    assert parse("bench", "train").rest == []


def test_parity():
    a = parse("parity", "experiments/debug_moe.yaml", "train.global_batch_size=8", "--layouts", "ep=1,nproc=1", "ep=2",
              "ep=2,zero=1", "--steps", "3", "--nproc", "4", "--tolerance", "1e-4", "--keep", "par", "--dump")
    assert a.func is commands.cmd_parity and a.config == "experiments/debug_moe.yaml"
    assert a.overrides == ["train.global_batch_size=8"] and a.layouts == ["ep=1,nproc=1", "ep=2", "ep=2,zero=1"]
    assert (a.steps, a.nproc, a.tolerance, a.keep, a.dump) == (3, 4, 1e-4, "par", True)
    a = parse("parity", "c.yaml", "--layouts", "ep=1", "ep=2")
    assert (a.steps, a.nproc, a.tolerance, a.keep, a.dump) == (5, None, 1e-5, None, False)


def test_ckpt_verify_and_export():
    a = parse("ckpt", "verify", "runs/x")
    assert a.func is commands.cmd_ckpt_verify and a.ckpt_command == "verify" and a.dir == "runs/x"
    a = parse("ckpt", "export", "runs/x/checkpoints/step_00000010", "model.safetensors")
    assert a.func is commands.cmd_ckpt_export and a.dir.endswith("step_00000010") and a.out == "model.safetensors"


def test_info():
    assert parse("info").func is commands.cmd_info


def test_help_imports_no_heavy_library():
    """`moe --help` builds the whole parser without torch, DeepSpeed, matplotlib or W&B."""
    code = ("import sys\nfrom moe.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nprint(sorted(m for m in ('torch', 'deepspeed', 'matplotlib', 'wandb') "
            "if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.splitlines()[-1] == "[]"
    assert "train" in proc.stdout and "launch" in proc.stdout
