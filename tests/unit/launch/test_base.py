"""moe/launch/base.py and errors.py: the launcher interface and the error of `moe launch`."""
import pytest

from moe.errors import MoeError
from moe.launch.base import Launcher
from moe.launch.errors import LaunchError


def test_a_launcher_must_implement_start_and_restarts_nothing_by_default():
    class Bare(Launcher):
        name = "bare"

    with pytest.raises(NotImplementedError):
        Bare().start(None, [], [], "stamp")
    assert Bare.job_control({"SLURM_JOB_ID": "1"}) is None


def test_launch_errors_are_moe_errors():
    assert issubclass(LaunchError, MoeError)  # the CLI shows them as `error: <message>`, exit 2
