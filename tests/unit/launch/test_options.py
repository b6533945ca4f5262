"""moe/launch/options.py: the options of `moe launch`, their checks, and the tasks a launch trains."""
import pytest

from moe.config import ConfigError, load_config
from moe.launch import LaunchError, LaunchOptions, launch, parse_array_spec
from moe.launch.options import check_options, check_plans, check_tasks, resolve_tasks, world_size

TINY = ["train.steps=3", "train.log_every=1", "train.eval_every=0"]


def opts(**kw):
    base = dict(config="experiments/debug_moe.yaml", overrides=list(TINY), nodes=2, gpus_per_node=1)
    base.update(kw)
    return LaunchOptions(**base)


def test_array_spec():
    assert parse_array_spec("0-3") == ([0, 1, 2, 3], None)
    assert parse_array_spec("0-6:3%2") == ([0, 3, 6], 2)
    assert parse_array_spec("5,1,8-9") == ([1, 5, 8, 9], None)
    for bad in ("", "a-b", "3-1", "1,1", "0-3%0"):
        with pytest.raises(LaunchError):
            parse_array_spec(bad)


def test_bad_input_is_rejected_before_sbatch(workdir, monkeypatch, fake_slurm):
    monkeypatch.chdir(workdir)
    cases = [
        (opts(nodes=0), LaunchError, "--nodes must be >= 1"),
        (opts(gpus_per_node=0), LaunchError, "--gpus-per-node must be >= 1"),
        (opts(partition="nosuch"), LaunchError, "unknown partition; sinfo knows: big, debug"),
        # 4 experts over 4 ranks, but the job has 2 x 1 processes
        (opts(overrides=TINY + ["parallel.ep_size=4"]), ConfigError, "parallel.ep_size (4) must divide the world size 2"),
        (opts(overrides=TINY + ["model.moe.top_k=9"]), ConfigError, "model.moe.top_k"),
        (opts(overrides=TINY + ["train.stepz=1"]), ConfigError, "stepz"),
        (opts(env=["HF_TOKEN=abc"]), LaunchError, "looks like a secret"),
        (opts(array="1-0"), LaunchError, "--array"),
        (opts(launcher="deepspeed", max_restarts=1), LaunchError, "--max-restarts needs --launcher torchrun"),
    ]
    for o, exc, msg in cases:
        with pytest.raises(exc) as info:
            launch(o)
        assert msg in str(info.value), (msg, str(info.value))
    assert not (workdir / "runs").exists()
    assert not (fake_slurm / "sbatch.calls").exists()


def test_option_messages():
    """The exact messages of check_options (the CLI prints them as `error: ...`)."""
    cases = [
        (opts(local=-1), "--local must be >= 1 processes, got -1"),
        (opts(local=2, array="0-1"), "--array needs Slurm; it cannot be combined with --local"),
        (opts(launcher="mpirun"), "--launcher must be torchrun or deepspeed, got 'mpirun'"),
        (opts(max_restarts=-1), "--max-restarts must be >= 0, got -1"),
        (opts(signal_s=-5), "--signal-seconds must be >= 0, got -5"),
        (opts(cpus_per_task=-1), "--cpus-per-task must be >= 0, got -1"),
        (opts(env=["NOVALUE"]), "--env 'NOVALUE': expected NAME=VALUE"),
        (opts(env=["1BAD=x"]), "--env '1BAD=x': expected NAME=VALUE"),
        (opts(env=["WANDB_API_KEY=x"]), "--env WANDB_API_KEY: looks like a secret and would be written into the "
                                        "job script; export it in the environment instead (jobs inherit it at run time)"),
        (opts(array="0-3%0"), "--array '0-3%0': %0 would never run a task"),
    ]
    for o, msg in cases:
        with pytest.raises(LaunchError) as info:
            check_options(o)
        assert str(info.value) == msg
    check_options(opts(local=2, nodes=0, gpus_per_node=0))  # --local ignores the Slurm sizes
    check_options(opts(env=["NCCL_DEBUG=INFO", "A_B=x=y"]))


def test_partition_is_checked_only_when_slurm_can_be_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo: nothing to check against
    check_options(opts(partition="anything"))


def test_world_size():
    assert world_size(opts(nodes=3, gpus_per_node=4)) == 12
    assert world_size(opts(nodes=3, gpus_per_node=4, local=2)) == 2


def test_array_tasks_get_their_own_config_and_run_folder(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    tasks = resolve_tasks(opts(array="1,4", overrides=TINY + ["run.seed={task}"]))
    assert [(t.task_id, t.cfg.run.name, t.cfg.run.seed) for t in tasks] == [(1, "debug_moe_1", 1),
                                                                           (4, "debug_moe_4", 4)]
    assert [t.config_path for t in tasks] == ["runs/debug_moe_1/config.yaml", "runs/debug_moe_4/config.yaml"]
    (single,) = resolve_tasks(opts())
    assert single.task_id is None and single.run_dir == "runs/debug_moe"


def test_check_tasks_names_the_run_and_refuses_a_shared_folder(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    cfg = load_config("experiments/debug_moe.yaml", TINY + ["parallel.ep_size=4"])
    with pytest.raises(ConfigError) as info:
        check_tasks(opts(), [(3, cfg)])
    assert str(info.value) == ("run debug_moe: parallel.ep_size (4) must divide the world size 2 "
                               "(--nodes 2 x --gpus-per-node 1)")
    with pytest.raises(ConfigError, match=r"^parallel.ep_size \(4\) must divide the world size 3 \(--local 3\)$"):
        check_tasks(opts(local=3), [(None, cfg)])
    same = load_config("experiments/debug_moe.yaml", TINY)
    with pytest.raises(LaunchError, match=r"array tasks share a run folder: \['debug_moe', 'debug_moe'\]"):
        check_tasks(opts(), [(0, same), (1, same)])


def test_a_run_that_does_not_fit_is_refused_before_anything_is_written(workdir, monkeypatch, capsys, fake_slurm):
    """`moe plan`'s verdict: debug_moe at 64 sequences of 64 tokens needs more than 2.03 GiB per GPU (2 of
    them the fixed overhead); the launch is refused with one error naming the largest term and an override
    that fits, before the run folder or sbatch; --force submits it; a CPU job (--cpu) is never checked."""
    monkeypatch.chdir(workdir)
    big = opts(overrides=TINY + ["train.micro_batch_size=64"], gpu_memory="2.03GiB", cpu=None)
    with pytest.raises(LaunchError, match=r"does not fit: .* largest term activations .*; try train\.\S+=.*"
                                          r"--force submits anyway"):
        launch(big)
    assert not (workdir / "runs").exists() and not (fake_slurm / "sbatch.calls").exists()
    assert launch(opts(overrides=big.overrides, gpu_memory="2.03GiB", force=True)) == 0
    assert "[moe plan] does not fit" in capsys.readouterr().err
    assert launch(opts(overrides=big.overrides, gpu_memory="2.03GiB", cpu=True)) == 0
    assert "[moe plan] estimated peak" in capsys.readouterr().err


def test_a_run_whose_vocabulary_comes_from_a_pretrained_tokenizer_is_not_planned(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    o = opts(overrides=TINY + ["data.tokenizer=gpt2"], gpu_memory="0.1GB")
    (task,) = check_tasks(o, [(None, load_config(o.config, o.overrides))])
    assert check_plans(o, [task], cuda_available=True) == [
        "[moe plan] not checked: set model.vocab_size (tokenizer 'gpt2') to plan the run before it starts"]
