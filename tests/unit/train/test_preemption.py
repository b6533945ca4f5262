"""moe/train/preemption.py: signals become one agreed stop, and only a SIGUSR2 stop asks the launcher
to restart the job (in-process: signals sent to this process, a fake launcher)."""
import os
import signal

import pytest
import torch

from moe.train.preemption import Preemption


class FakeLauncher:
    name = "fake"

    def __init__(self):
        self.calls = 0

    def resume_later(self) -> str:
        self.calls += 1
        return "[moe] fake: restarting later"


@pytest.fixture
def preemption():
    launcher = FakeLauncher()
    p = Preemption(launcher)
    yield p, launcher
    p.restore()


def test_no_signal_no_stop(preemption):
    p, launcher = preemption
    assert p.requested(torch.device("cpu")) == (False, False)
    assert p.requested(torch.device("cpu"), diverged=True) == (False, True)
    p.finish(rank=0, step=3)
    assert launcher.calls == 0


def test_usr2_stops_and_asks_the_launcher_once(preemption, capsys):
    p, launcher = preemption
    os.kill(os.getpid(), signal.SIGUSR2)
    assert p.requested(torch.device("cpu")) == (True, False)
    assert p.signal_name() == "SIGUSR2"
    p.finish(rank=0, step=7)
    out = capsys.readouterr().out
    assert "stopped after step 7 on SIGUSR2" in out and "fake: restarting later" in out
    assert launcher.calls == 1
    # the handlers stay: the launcher's own SIGTERM for the restart must not kill the exiting process
    assert signal.getsignal(signal.SIGTERM) == p._handle


def test_term_wins_over_usr2_and_never_restarts(preemption):
    p, launcher = preemption
    os.kill(os.getpid(), signal.SIGUSR2)
    os.kill(os.getpid(), signal.SIGTERM)
    assert p.requested(torch.device("cpu"))[0]
    assert p.signal_name() == "SIGTERM"
    p.finish(rank=0, step=1)
    assert launcher.calls == 0
    assert signal.getsignal(signal.SIGTERM) != p._handle  # restored


def test_only_rank_0_asks_the_launcher(preemption):
    p, launcher = preemption
    os.kill(os.getpid(), signal.SIGUSR2)
    p.requested(torch.device("cpu"))
    p.finish(rank=1, step=1)
    assert launcher.calls == 0


def test_without_a_launcher_a_usr2_stop_just_ends():
    p = Preemption(None)
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert p.requested(torch.device("cpu"))[0]
        p.finish(rank=0, step=1)
        assert signal.getsignal(signal.SIGUSR2) != p._handle
    finally:
        p.restore()


def test_second_ctrl_c_aborts_at_once(preemption):
    p, _ = preemption
    os.kill(os.getpid(), signal.SIGINT)
    assert p.requested(torch.device("cpu"))[0] and p.signal_name() == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
