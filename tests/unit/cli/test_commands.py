"""moe/cli/commands.py: what each `moe` command does with its arguments, run in-process (heavy work
replaced by fakes), and main() of moe/cli/__init__.py, which runs them: every failure a user can
cause ends as exactly one `error:` line on stderr with exit 2 (KeyboardInterrupt: 130), MOE_DEBUG=1
shows the traceback instead."""
import errno
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from moe import ops
from moe.cli import commands, describe_error, main
from moe.config import ConfigError
from moe.errors import CheckpointNotFound
from moe.nn.experts import describe_auto_impl

from tests.helpers import ROOT

MOE_YAML = os.path.join(ROOT, "experiments", "debug_moe.yaml")


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("MOE_DEBUG", raising=False)


def fails(capsys, argv, code=2) -> str:
    """main(argv) exits with `code` after exactly one `error:` line on stderr; that line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.rstrip("\n")


def raising(exc):
    def command(args):
        raise exc
    return command


# ------------------------------------------------------------------------- main(): one error line


@pytest.mark.parametrize("exc,line", [
    (ConfigError("train.lr must be > 0 and <= 10, got -1"), "error: train.lr must be > 0 and <= 10, got -1"),
    (ConfigError("first line\nsecond line\n"), "error: first line second line"),  # always one line
    (CheckpointNotFound("runs/x: no checkpoint"), "error: runs/x: no checkpoint"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/run/metrics.jsonl"),
     "error: /data/run/metrics.jsonl: no space left on the device (disk full)"),
    (OSError(errno.ENOSPC, "No space left on device"), "error: no space left on the device (disk full)"),
    (PermissionError(errno.EACCES, "Permission denied", "/etc/x"), "error: /etc/x: Permission denied"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "a.tmp", None, "b"), "error: a.tmp -> b: Invalid cross-device link"),
    (FileNotFoundError("plain message"), "error: plain message"),
    (RuntimeError("boom\nand the rest"), "error: RuntimeError: boom (unexpected; MOE_DEBUG=1 shows the traceback)"),
    (KeyError("model"), "error: KeyError: 'model' (unexpected; MOE_DEBUG=1 shows the traceback)"),
])
def test_a_failing_command_ends_as_one_error_line(monkeypatch, capsys, exc, line):
    monkeypatch.setattr(commands, "cmd_info", raising(exc))
    assert fails(capsys, ["info"]) == line
    assert capsys.readouterr().out == ""


def test_describe_error_names_the_error_type_of_an_empty_message():
    assert describe_error(ValueError()) == "ValueError:  (unexpected; MOE_DEBUG=1 shows the traceback)"
    assert describe_error(ConfigError("  padded \n")) == "padded"


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    monkeypatch.setattr(commands, "cmd_info", raising(KeyboardInterrupt()))
    assert fails(capsys, ["info"], code=130) == "error: interrupted"


@pytest.mark.parametrize("exc", [ConfigError("bad key"), OSError(errno.ENOSPC, "No space left on device", "f"),
                                 RuntimeError("boom"), KeyboardInterrupt()])
def test_moe_debug_shows_the_traceback(monkeypatch, capsys, exc):
    monkeypatch.setattr(commands, "cmd_info", raising(exc))
    monkeypatch.setenv("MOE_DEBUG", "1")
    with pytest.raises(type(exc)) as info:
        main(["info"])
    assert info.value is exc
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("MOE_DEBUG", "0")  # 0 is off
    with pytest.raises(SystemExit):
        main(["info"])
    assert capsys.readouterr().err.startswith("error: ")


def test_die_reraises_the_handled_error_only_in_debug_mode(monkeypatch, capsys):
    def command(args):
        try:
            raise ConfigError("the original")
        except ConfigError:
            commands.die("the one line")

    monkeypatch.setattr(commands, "cmd_info", command)
    assert fails(capsys, ["info"]) == "error: the one line"
    monkeypatch.setenv("MOE_DEBUG", "1")
    with pytest.raises(ConfigError, match="the original"):
        main(["info"])
    # outside an exception there is no traceback to show: the line, even in debug mode
    with pytest.raises(SystemExit) as info:
        commands.die("no exception")
    assert info.value.code == 2 and capsys.readouterr().err == "error: no exception\n"


def test_a_commands_own_exit_status_passes_through(monkeypatch, capsys):
    def command(args):
        sys.exit(1)

    monkeypatch.setattr(commands, "cmd_info", command)
    with pytest.raises(SystemExit) as info:
        main(["info"])
    assert info.value.code == 1 and capsys.readouterr().err == ""


def test_local_rank_is_exported_unless_already_set(monkeypatch):
    seen = []
    monkeypatch.setattr(commands, "cmd_info", lambda args: seen.append(os.environ.get("LOCAL_RANK")))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    main(["--local_rank=3", "info"])
    monkeypatch.setenv("LOCAL_RANK", "5")  # the launcher's environment wins
    main(["--local_rank=3", "info"])
    monkeypatch.delenv("LOCAL_RANK")
    main(["info"])
    assert seen == ["3", "5", None]


# ---------------------------------------------------------------------------------------- moe info


def _info(capsys) -> dict:
    main(["info"])
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        key, _, value = line.partition("  ")
        rows[key.strip()] = value.strip()
    return rows


def test_info_names_the_live_dispatch_and_expert_backends(capsys, monkeypatch):
    monkeypatch.delenv("MOE_DISPATCH", raising=False)
    rows = _info(capsys)
    if ops.extension_available():
        assert rows["dispatch backend"].startswith("extension (moe._C has CPU")
        assert rows["expert backend"].startswith("loop, as one compiled grouped SwiGLU op")
        gemm = "fp32 GEMM: its own, AVX2 + FMA" if ops.cpu_expert_gemm() == "own" else "fp32 GEMM: ATen's"
        assert gemm in rows["expert backend"]  # the GEMM the compiled expert ops use
    else:
        assert rows["dispatch backend"] == "reference (compiled extension not built)"
    monkeypatch.setenv("MOE_DISPATCH", "reference")
    rows = _info(capsys)
    assert rows["dispatch backend"].startswith("reference (") and rows["dispatch backend"].endswith(
        "[forced by MOE_DISPATCH]")
    assert rows["expert backend"].startswith("loop (a GEMM per expert")


def test_info_lists_versions_and_the_device(capsys):
    rows = _info(capsys)
    assert rows["moe"] == __import__("moe").__version__ and rows["torch"] == torch.__version__
    assert rows["python"] == ".".join(map(str, sys.version_info[:3]))
    assert {"deepspeed", "wandb", "datasets", "tokenizers", "host memory"} <= set(rows)
    if not torch.cuda.is_available():
        assert rows["device"] == f"cpu ({torch.get_num_threads()} threads)"
        assert rows["distributed backend"] == "gloo"


@pytest.mark.parametrize("backend", ["extension", "reference"])
def test_auto_expert_backend_on_cuda_is_described_without_a_gpu(backend):
    """The `expert backend` row of `moe info` on a GPU machine."""
    text = describe_auto_impl(torch.device("cuda"), backend)
    assert ("torch._grouped_mm" in text) == hasattr(torch, "_grouped_mm") and "bf16" in text


# --------------------------------------------------------------------------------- moe train


@pytest.fixture
def fake_train(monkeypatch):
    """moe.train.loop.train replaced: the configs it was called with, and the launcher."""
    import moe.launch
    import moe.train.loop

    calls = []
    monkeypatch.setattr(moe.train.loop, "train", lambda cfg, launcher: calls.append((cfg, launcher)))
    monkeypatch.setattr(moe.launch, "job_launcher", lambda: "the job's launcher")
    for name in ("WANDB_SWEEP_ID", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_train_loads_the_config_with_the_overrides(fake_train):
    main(["train", MOE_YAML, "train.steps=3", "model.moe.top_k=1"])
    ((cfg, launcher),) = fake_train
    assert (cfg.train.steps, cfg.model.moe.top_k, cfg.run.name) == (3, 1, "debug_moe")
    assert launcher == "the job's launcher"


def test_train_under_a_wandb_agent_gets_a_run_folder_per_agent_run(fake_train, monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    main(["train", MOE_YAML])
    main(["train", MOE_YAML, "run.name=mine"])  # an explicit name is kept
    assert [cfg.run.name for cfg, _ in fake_train] == ["debug_moe-abc123", "mine"]


def test_train_bad_override_or_missing_config_is_one_line(fake_train, capsys, tmp_path):
    assert "model.moe.topk" in fails(capsys, ["train", MOE_YAML, "model.moe.topk=1"])
    assert str(tmp_path / "nope.yaml") in fails(capsys, ["train", str(tmp_path / "nope.yaml")])
    assert fake_train == []


# --------------------------------------------------------------------------------- moe launch


def test_launch_maps_every_flag_to_the_launch_options(monkeypatch):
    import moe.launch

    calls = []
    monkeypatch.setattr(moe.launch, "launch", lambda opts, argv: calls.append((opts, argv)) or 3)
    argv = ["launch", "c.yaml", "a=1", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time",
            "1:00:00", "--signal-seconds", "30", "--sbatch-arg=--reservation=r", "--env", "X=1", "--array", "0-3",
            "--dry-run", "--mail-user", "me", "--job-name", "j", "--cpus-per-task", "8", "--launcher", "deepspeed"]
    monkeypatch.setattr(sys, "argv", ["moe", *argv])
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 3  # launch()'s status is the exit status
    ((opts, forwarded),) = calls
    assert forwarded == argv[1:]  # what the job script records as the command
    assert (opts.config, opts.overrides, opts.nodes, opts.gpus_per_node, opts.local) == ("c.yaml", ["a=1"], 2, 4, 0)
    assert (opts.partition, opts.time, opts.signal_s, opts.sbatch_args, opts.env, opts.array, opts.dry_run) == \
        ("gpu", "1:00:00", 30, ["--reservation=r"], ["X=1"], "0-3", True)
    assert (opts.mail_user, opts.job_name, opts.cpus_per_task, opts.launcher) == ("me", "j", 8, "deepspeed")
    assert opts.cpu is None  # without --cpu the partition's GRES decide
    main_args = ["launch", "--local", "2", "--cpu", "c.yaml"]
    with pytest.raises(SystemExit):
        main(main_args)
    assert (calls[1][0].local, calls[1][0].cpu) == (2, True)


# ---------------------------------------------------------------------------------- moe sweep


def write_sweep(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nbase: {MOE_YAML}\n{text}")
    return str(path)


def test_sweep_dry_run_lists_the_runs_and_runs_nothing(tmp_path, capsys):
    path = write_sweep(tmp_path, "grid:\n  model.moe.top_k: [1, 2]\n")
    main(["sweep", path, "--root", str(tmp_path / "runs"), "--dry-run"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"[sweep] s: 2 runs under {tmp_path / 'runs' / 's'}"
    assert out[1].startswith(f"  top_k=1: moe train {MOE_YAML} model.moe.top_k=1 run.name=top_k=1 ")
    assert out[2].startswith("  top_k=2: ") and len(out) == 3
    assert sorted(os.listdir(tmp_path)) == ["s.yaml"]


def test_sweep_export_wandb_writes_the_sweep_config(tmp_path, capsys):
    path = write_sweep(tmp_path, "variants:\n  - {model.moe.top_k: 1}\n  - {model.moe.top_k: 2}\n")
    out = tmp_path / "wandb.yaml"
    main(["sweep", path, "--root", str(tmp_path / "runs"), "--export-wandb", str(out)])
    captured = capsys.readouterr()
    assert "`variants` are exported as independent value lists" in captured.err
    assert captured.out.startswith(f"wrote {out}; start it with: wandb sweep {out}")
    cfg = yaml.safe_load(out.read_text())
    assert cfg["name"] == "s" and cfg["parameters"] == {"model.moe.top_k": {"values": [1, 2]}}
    assert not (tmp_path / "runs").exists()


def test_sweep_bad_parallel_and_bad_file_are_one_line(tmp_path, capsys):
    path = write_sweep(tmp_path, "grid:\n  model.moe.top_k: [1, 2]\n")
    assert fails(capsys, ["sweep", path, "--root", str(tmp_path), "--parallel", "-1"]).endswith(
        "--parallel must be >= 1, got -1")
    assert fails(capsys, ["sweep", str(tmp_path / "none.yaml")]) == f"error: sweep file not found: {tmp_path / 'none.yaml'}"


# ----------------------------------------------------------- moe bench, parity, ckpt, generate, eval


def test_bench_runs_the_benchmark_module_from_the_checkout(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, cwd, env: calls.append((cmd, cwd, env)) or 4)
    with pytest.raises(SystemExit) as info:
        main(["bench", "dispatch", "--json", "o.json"])
    assert info.value.code == 4
    ((cmd, cwd, env),) = calls
    assert cmd == [sys.executable, "-m", "benchmarks.dispatch", "--json", "o.json"]
    assert cwd == ROOT and env["PYTHONPATH"] == ROOT


def test_bench_unknown_benchmark(capsys):
    assert fails(capsys, ["bench", "nosuch"]).startswith("error: benchmarks/nosuch.py not found")


def test_parity_exit_status_is_main_paritys(monkeypatch):
    import moe.tools.parity

    seen = []
    monkeypatch.setattr(moe.tools.parity, "main_parity", lambda args: seen.append(args.layouts) or 1)
    with pytest.raises(SystemExit) as info:
        main(["parity", "c.yaml", "--layouts", "ep=1", "ep=2"])
    assert info.value.code == 1 and seen == [["ep=1", "ep=2"]]


@pytest.mark.parametrize("argv", [["ckpt", "verify", "{d}"], ["ckpt", "export", "{d}", "{d}/out.safetensors"]])
def test_ckpt_on_a_folder_without_checkpoint(tmp_path, capsys, argv):
    d = tmp_path / "empty"
    d.mkdir()
    line = fails(capsys, [a.format(d=d) for a in argv])
    assert line == f"error: {d}: not a checkpoint (no meta.json) and no checkpoints/latest"
    assert os.listdir(d) == []


def write_step(tmp_path, meta, files=()):
    step = tmp_path / "step_00000002"
    step.mkdir()
    (step / "meta.json").write_text(json.dumps(meta))
    for f in files:
        (step / f).write_bytes(b"")
    return step


def test_ckpt_verify_lists_the_problems_and_exits_1(tmp_path, capsys):
    step = write_step(tmp_path, {"step": 2})  # a meta.json and nothing it promises
    with pytest.raises(SystemExit) as info:
        main(["ckpt", "verify", str(step)])
    assert info.value.code == 1
    err = capsys.readouterr().err.splitlines()
    count = int(err[0].split(": ")[1].split()[0])
    assert err[0] == f"{step}: {count} problems" and count >= 1 and len(err) == count + 1
    assert all(line.startswith("  ") for line in err[1:])


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_generate_and_eval_on_a_folder_that_is_not_a_run(tmp_path, capsys, command):
    flags = ["--prompt", "x"] if command == "generate" else ["--data", str(tmp_path / "d.txt")]
    line = fails(capsys, [command, str(tmp_path), *flags])
    assert line == f"error: {tmp_path}: not a run folder (no config.yaml)"


def test_data_prepare_prints_a_summary_and_resumes(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    for i in range(6):
        (tmp_path / "docs" / f"d{i}.txt").write_text(f"document {i} " * 50)
    (tmp_path / "data.yaml").write_text(f"dataset: {tmp_path / 'docs'}\nval_fraction: 0.3\n")
    argv = ["data", "prepare", str(tmp_path / "data.yaml"), f"data.cache_dir={tmp_path / 'cache'}",
            "--out", str(tmp_path / "out"), "--no-progress", "--shard-mb", "0.001"]
    main(argv)
    out = capsys.readouterr().out
    n_bytes = 6 * len("document 0 " * 50)  # two documents per 1048-character shard; + one EOS each
    assert f"{tmp_path / 'out'}: {n_bytes + 6:,} tokens tokenized in" in out and "tokens/s, 1 workers)" in out
    assert f"6 documents, {n_bytes + 6:,} tokens" in out and f"{n_bytes:,} bytes of text, 3 shards, tokenizer bytes" in out
    assert f"train on it with data.dataset={tmp_path / 'out'} data.tokenizer=bytes" in out
    main(argv)
    assert "already prepared" in capsys.readouterr().out
    assert fails(capsys, argv[:3] + ["--workers", "0", "--out", str(tmp_path / "x")]) == \
        "error: --workers must be >= 1, got 0"
