"""moe/launch/local.py: `moe launch --local N` (torchrun --standalone here) and its signal forwarding."""
import json
import os
import signal
import subprocess
import sys
import threading
import time


import moe.launch.local
from moe.launch import LaunchOptions, launch
from moe.launch.local import _LocalRun, _stopped_status
from moe.launch.options import resolve_tasks

TINY = ["train.steps=3", "train.log_every=1", "train.eval_every=0"]


def opts(**kw):
    base = dict(config="experiments/debug_moe.yaml", overrides=list(TINY), local=2)
    base.update(kw)
    return LaunchOptions(**base)


def test_dry_run_prints_the_local_script(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert launch(opts(dry_run=True, env=["FOO=a b"], max_restarts=1), ["--local", "2"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "#!/bin/bash" and lines[1].startswith("# Written by `moe launch --local` on ")
    assert lines[2:] == [
        "#   moe launch --local 2", "# Run it again to resume from the latest checkpoint.", "set -euo pipefail",
        f"cd {workdir}", "export FOO='a b'",
        f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node=2 --max-restarts=1 "
        f"--log-dir=runs/debug_moe/logs/local-{lines[1].split()[-1][:-1]} --redirects=3 --tee=3 "
        f"-m moe.cli train runs/debug_moe/config.yaml"]
    plan, dry = err.splitlines()  # `moe plan`'s estimate (a CPU machine: host memory only), the dry run's note
    assert plan.startswith("[moe plan] estimated peak") or plan.startswith("[moe plan] fits")
    assert dry == "# dry run: nothing written, nothing started; the run would train runs/debug_moe/config.yaml"
    assert not (workdir / "runs").exists()


def test_local_launch_writes_the_run_folder_and_runs_torchrun(workdir, monkeypatch, capsys):
    """Without a real torchrun (`_LocalRun.run` is replaced): the files written, the command and the
    environment it gets (--env settings in, SLURM_JOB_ID out: a stop must never requeue an allocation)."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("SLURM_JOB_ID", "555")
    seen = {}

    def fake_run(self, cmd, env):
        seen.update(cmd=cmd, env=env)
        return 3

    monkeypatch.setattr(_LocalRun, "run", fake_run)
    assert launch(opts(env=["FOO=bar"]), ["--local", "2"]) == 3  # no stop request: torchrun's exit status
    run = workdir / "runs" / "debug_moe"
    assert sorted(os.listdir(run)) == ["code", "config.yaml", "launch.json", "launch_local.sh"]
    assert os.access(run / "launch_local.sh", os.X_OK)
    assert (run / "launch_local.sh").read_text().splitlines()[-1].split()[:4] == [
        sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert seen["cmd"][-4:] == ["-m", "moe.cli", "train", "runs/debug_moe/config.yaml"]
    assert seen["env"]["FOO"] == "bar" and "SLURM_JOB_ID" not in seen["env"]
    (entry,) = json.loads((run / "launch.json").read_text())["launches"]
    assert entry["local"] == 2 and entry["configs"] == ["runs/debug_moe/config.yaml"]
    assert "[moe launch] local: 2 process(es) on this machine, config runs/debug_moe/config.yaml" in capsys.readouterr().out


def test_exit_status_after_a_stop_request(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    (task,) = resolve_tasks(opts())
    os.makedirs(task.run_dir)
    summary = os.path.join(task.run_dir, "summary.json")
    started = time.time() - 5
    assert _stopped_status(task, signal.SIGTERM, 1, started) == 1  # no summary: no final checkpoint
    assert "stopped on SIGTERM without a final checkpoint (run status unknown, torchrun exit 1)" in capsys.readouterr().err
    for status, code, expected in (("preempted", 1, 0), ("finished", 0, 0), ("finished", 3, 3), ("failed", 0, 1)):
        with open(summary, "w") as f:
            json.dump({"status": status}, f)
        assert _stopped_status(task, signal.SIGINT, code, started) == expected, status
    assert _stopped_status(task, signal.SIGHUP, 0, time.time() + 60) == 1  # a summary of an earlier run
    out = capsys.readouterr().out
    assert "stopped on SIGINT as asked, checkpoint saved; the same command (or bash runs/debug_moe/launch_local.sh)" in out


# A stand-in for torchrun: starts one worker in a session of its own (as torchrun does) and exits with
# its exit status. The worker writes <dir>/ready, then <dir>/USR2 or <dir>/TERM on those signals; on
# SIGTERM it exits 0 unless IGNORE_TERM is set.
TORCHRUN = """
import subprocess, sys
sys.exit(subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True).wait())
"""
WORKER = """
import os, signal, sys, time
d = sys.argv[1]
def on(sig, _):
    open(os.path.join(d, signal.Signals(sig).name[3:]), "w").close()
    if sig == signal.SIGTERM and not os.environ.get("IGNORE_TERM"):
        sys.exit(0)
signal.signal(signal.SIGUSR2, on)
signal.signal(signal.SIGTERM, on)
open(os.path.join(d, "ready"), "w").close()
time.sleep(60)
sys.exit(5)
"""


def wait_for(path, timeout=30):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert time.time() < deadline, f"no {path}"
        time.sleep(0.02)


def run_fake_torchrun(tmp_path, env_extra, *signals):
    """Run the stand-in under _LocalRun; once its worker is ready, deliver `signals` as this process
    would receive them (each waits for the marker file it names, if any). Returns (exit status, run)."""
    run = _LocalRun()

    def deliver():
        wait_for(tmp_path / "ready")
        for sig, marker in signals:
            run.handle(sig, None)
            if marker:
                wait_for(tmp_path / marker)

    thread = threading.Thread(target=deliver, daemon=True)
    thread.start()
    env = dict(os.environ, **env_extra)
    code = run.run([sys.executable, "-c", TORCHRUN, WORKER, str(tmp_path)], env)
    thread.join(timeout=30)
    return code, run


def test_stop_requests_go_to_the_workers(tmp_path, capsys):
    """USR2 is passed to the workers as is; SIGINT (like SIGTERM, SIGHUP) becomes SIGTERM to the workers,
    which stop cleanly, and torchrun exits with their status; the handlers are restored afterwards."""
    before = signal.getsignal(signal.SIGTERM)
    code, run = run_fake_torchrun(tmp_path, {}, (signal.SIGUSR2, "USR2"), (signal.SIGINT, None))
    assert code == 0 and run.stop_signal == signal.SIGINT
    assert (tmp_path / "USR2").exists() and (tmp_path / "TERM").exists()
    assert "SIGINT: asking the training to save a checkpoint and stop" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_stop_request_kills_the_run(tmp_path, capsys):
    code, run = run_fake_torchrun(tmp_path, {"IGNORE_TERM": "1"}, (signal.SIGTERM, "TERM"), (signal.SIGTERM, None))
    assert code == 128 + signal.SIGKILL and run.stop_signal == signal.SIGTERM
    assert "SIGTERM again: killing the run now" in capsys.readouterr().err


def test_a_stop_request_before_torchrun_started_ends_it(tmp_path):
    run = _LocalRun()
    run.handle(signal.SIGTERM, None)  # queued until torchrun exists; it has no worker yet then
    code = run.run([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))
    assert code == 128 + signal.SIGTERM and run.stop_signal == signal.SIGTERM


def test_torchrun_child_ignores_usr2_in_its_own_process_group():
    proc = subprocess.Popen([sys.executable, "-c", "import os, signal; print(os.getpgid(0) == os.getpid(), "
                             "signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN)"], stdout=subprocess.PIPE, text=True,
                            preexec_fn=moe.launch.local._torchrun_child_setup)
    assert proc.communicate(timeout=60)[0].split() == ["True", "True"]
