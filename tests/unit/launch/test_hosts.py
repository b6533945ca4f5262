"""moe/launch/hosts.py: DeepSpeed hostfiles and `python -m moe.launch world-info` of the job script."""
import base64
import json
import os
import subprocess
import sys

import pytest

from moe.launch import LaunchError, world_info
from moe.launch.hosts import read_hostfile
from tests.helpers import ROOT


def test_world_info_from_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=2\nnode2 slots=2\n")
    assert json.loads(base64.urlsafe_b64decode(world_info(str(hostfile)))) == {"node1": [0, 1], "node2": [0, 1]}


def test_hostfile_lines(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# the allocation\nb slots=1  # first\n\na slots=3\n")
    assert list(read_hostfile(str(hostfile)).items()) == [("b", 1), ("a", 3)]  # in file order
    for text, msg in (("a slots=1\na slots=2\n", ":2: expected a new `host slots=N` line, got 'a slots=2'"),
                      ("a slots=0\n", ":1: expected a new `host slots=N` line"), ("a\n", ":1: expected"),
                      ("# nothing\n", ": no hosts")):
        hostfile.write_text(text)
        with pytest.raises(LaunchError, match=msg):
            read_hostfile(str(hostfile))


def test_python_m_moe_launch_world_info_prints_only_the_value(tmp_path):
    """The job script captures its stdout (`MOE_WORLD_INFO=$(... -m moe.launch world-info ...)`)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=2\n")
    proc = subprocess.run([sys.executable, "-m", "moe.launch", "world-info", str(hostfile)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == world_info(str(hostfile)) + "\n"
    usage = subprocess.run([sys.executable, "-m", "moe.launch"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert usage.returncode == 2 and usage.stdout == "" and "usage: python -m moe.launch world-info" in usage.stderr
