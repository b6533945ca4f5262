"""moe.launch's interface: the launcher registry behind `launch()`, `job_launcher()` for a running job,
and the names the rest of moe imports from the package.

Slurm's commands are replaced by small fakes on PATH where a test needs them; the tests against a real
cluster are in tests/integration/test_slurm.py.
"""
import os

import pytest

import moe.launch
from moe.launch import (LAUNCHERS, JobControl, LaunchError, Launcher, LaunchOptions, LocalLauncher, SlurmLauncher,
                        get_launcher, job_launcher, launch, redact)

TINY = ["train.steps=3", "train.log_every=1", "train.eval_every=0"]


def opts(**kw):
    base = dict(config="experiments/debug_moe.yaml", overrides=list(TINY), nodes=2, gpus_per_node=1)
    base.update(kw)
    return LaunchOptions(**base)


def test_registry_names_the_launchers():
    assert LAUNCHERS == {"slurm": SlurmLauncher, "local": LocalLauncher}
    for name, cls in LAUNCHERS.items():
        assert issubclass(cls, Launcher) and cls.name == name
        assert isinstance(get_launcher(name), cls)
    with pytest.raises(LaunchError, match="unknown launcher 'k8s'; known: slurm, local"):
        get_launcher("k8s")


class RecordingLauncher(Launcher):
    name = "recording"
    calls = []

    def start(self, opts, tasks, command, stamp):
        self.calls.append((opts, tasks, list(command), stamp))
        return 7


@pytest.mark.parametrize("local, name", [(0, "slurm"), (2, "local")])
def test_launch_checks_then_hands_the_tasks_to_the_launcher_by_name(workdir, monkeypatch, fake_slurm, local, name):
    """launch() checks the options and configs, then starts the launcher registered under "local"
    (--local N) or "slurm"; its exit status is launch()'s. Nothing is written before that."""
    monkeypatch.chdir(workdir)
    RecordingLauncher.calls = []
    monkeypatch.setitem(LAUNCHERS, name, RecordingLauncher)
    o = opts(local=local)
    assert launch(o, ["x.yaml", "--nodes", "2"]) == 7
    ((got, tasks, command, stamp),) = RecordingLauncher.calls
    assert got is o and command == ["moe", "launch", "x.yaml", "--nodes", "2"]
    assert [t.run_dir for t in tasks] == ["runs/debug_moe"] and tasks[0].cfg.train.steps == 3
    assert len(stamp) == len("20260101-120000") and stamp[8] == "-"
    assert not (workdir / "runs").exists()
    with pytest.raises(LaunchError, match="--max-restarts must be >= 0"):  # the checks come first
        launch(opts(local=local, max_restarts=-1))
    assert len(RecordingLauncher.calls) == 1


def test_job_launcher_inside_a_slurm_job_requeues(fake_scontrol, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    control = job_launcher()
    assert control is not None and control.name == "slurm"
    assert control.resume_later() == "[moe] requeued Slurm job 4711"
    assert (fake_scontrol / "scontrol.calls").read_text() == "requeue 4711\n"
    assert capsys.readouterr().out == ""  # the caller prints the line (rank 0 of training)

    monkeypatch.setenv("FAKE_SCONTROL_ERROR", "  scontrol: error: Job is not requeueable  \n")
    assert control.resume_later() == "[moe] scontrol requeue 4711 failed (exit 1): scontrol: error: Job is not requeueable"


def test_job_launcher_without_slurm_is_none(monkeypatch, fake_scontrol):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert job_launcher() is None
    monkeypatch.setenv("SLURM_JOB_ID", "")  # set but empty: not a job
    assert job_launcher() is None
    assert job_launcher({}) is None
    assert job_launcher({"SLURM_JOB_ID": "12"}).name == "slurm"  # an explicit environment wins
    assert not (fake_scontrol / "scontrol.calls").exists()


def test_job_control_is_the_duck_type_training_calls():
    control = job_launcher({"SLURM_JOB_ID": "1"})
    assert isinstance(control.name, str) and callable(control.resume_later)
    assert set(JobControl.__annotations__) == {"name"} and callable(JobControl.resume_later)
    assert LocalLauncher.job_control({"SLURM_JOB_ID": "1"}) is None  # nothing restarts a local run


def test_every_name_moe_imports_from_the_package_is_there():
    wanted = {"LaunchError", "LaunchOptions", "launch", "parse_array_spec", "redact", "world_info",
              "active_array_tasks", "check_options", "check_tasks", "submit", "wait_for_job", "ROOT", "TEMPLATE",
              "secret_file_reason", "job_launcher", "JobControl", "Launcher", "LAUNCHERS"}
    assert wanted <= set(moe.launch.__all__)
    for name in moe.launch.__all__:
        assert hasattr(moe.launch, name), name
    assert moe.launch.ROOT == os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(moe.launch.__file__))))
    assert os.path.isfile(moe.launch.TEMPLATE) and moe.launch.TEMPLATE.endswith(os.path.join("launch", "job.sbatch"))


def test_redact_replaces_secret_values_only():
    env = {"HF_TOKEN": "hf_abcdefgh", "PATH": "/usr/bin", "SHORT_KEY": "abc"}
    assert redact("a hf_abcdefgh /usr/bin abc", env) == "a <redacted> /usr/bin abc"
