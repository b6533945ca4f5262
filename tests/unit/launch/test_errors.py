"""moe/launch/errors.py: LaunchError, the error of `moe launch` (bad options, a failed submission). It
is a MoeError: its message is shown to the user as is, after `error: `, with exit 2."""
import os

import pytest

import moe.launch
from moe.cli import describe_error, main
from moe.errors import MoeError
from moe.launch.errors import LaunchError

from tests.helpers import ROOT

MOE_YAML = os.path.join(ROOT, "experiments", "debug_moe.yaml")


def test_launch_error_is_a_moe_error_and_exported_by_moe_launch():
    assert issubclass(LaunchError, MoeError)
    assert moe.launch.LaunchError is LaunchError
    assert "LaunchError" in moe.launch.__all__
    exc = LaunchError("--nodes must be >= 1, got 0")
    assert str(exc) == describe_error(exc) == "--nodes must be >= 1, got 0"


@pytest.mark.parametrize("flags,line", [
    (["--nodes", "0"], "error: --nodes must be >= 1, got 0"),
    (["--local", "2", "--array", "0-3"], "error: --array needs Slurm; it cannot be combined with --local"),
    (["--array", "3-1"], "error: --array '3-1': empty range '3-1'"),
    (["--launcher", "deepspeed", "--max-restarts", "2"],
     "error: --max-restarts needs --launcher torchrun (the deepspeed launcher does not restart workers)"),
])
def test_bad_launch_options_are_one_error_line_before_anything_is_written(tmp_path, monkeypatch, capsys, flags, line):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MOE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["launch", MOE_YAML, "run.root=runs", *flags])
    assert info.value.code == 2
    assert capsys.readouterr().err == line + "\n"
    assert os.listdir(tmp_path) == []


def test_a_launch_error_raised_in_another_command_is_shown_the_same(monkeypatch, capsys):
    from moe.cli import commands

    monkeypatch.delenv("MOE_DEBUG", raising=False)

    def command(args):
        raise LaunchError("sbatch not found: this machine is not a Slurm login node")

    monkeypatch.setattr(commands, "cmd_info", command)
    with pytest.raises(SystemExit) as info:
        main(["info"])
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: sbatch not found: this machine is not a Slurm login node\n"
