"""moe/launch/cluster.py: what Slurm says about partitions and jobs, with fake Slurm commands."""
import pytest

from moe.launch import active_array_tasks, wait_for_job
from moe.launch.cluster import job_states, partition_has_gpus, slurm_partitions


def test_partitions_and_gres(fake_slurm):
    assert slurm_partitions() == ["big", "debug"]  # the default partition without its `*`
    assert partition_has_gpus("big") is False
    (fake_slurm / "sinfo").write_text("#!/bin/bash\necho 'gpu:a100:8(S:0-1)'\n")
    assert partition_has_gpus(None) is True
    (fake_slurm / "sinfo").write_text("#!/bin/bash\nexit 1\n")
    assert slurm_partitions() is None and partition_has_gpus("big") is None


def test_without_slurm_nothing_can_be_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert slurm_partitions() is None and partition_has_gpus("x") is None and active_array_tasks("1") == {}


def test_active_array_tasks(fake_slurm):
    (fake_slurm / "squeue.out").write_text("0 RUNNING\n2 PENDING\n3 COMPLETED\nN/A RUNNING\n5 REQUEUED\n")
    assert active_array_tasks("42") == {0: "RUNNING", 2: "PENDING", 5: "REQUEUED"}


def test_job_states_and_waiting(fake_scontrol, capsys):
    out = fake_scontrol / "scontrol.out"
    out.write_text("JobId=10 JobName=a JobState=COMPLETED ExitCode=0:0\nJobId=11 JobState=COMPLETED ExitCode=0:0\n")
    assert job_states("10") == {"10": ("COMPLETED", "0:0"), "11": ("COMPLETED", "0:0")}
    assert wait_for_job("10", poll_s=0) is True
    assert "10 COMPLETED, 11 COMPLETED" in capsys.readouterr().out
    out.write_text("JobId=10 JobState=COMPLETED ExitCode=0:0\nJobId=11 JobState=FAILED ExitCode=1:0\n")
    assert wait_for_job("10", poll_s=0) is False
    out.unlink()
    assert wait_for_job("10", poll_s=0) is False
    assert "job 10 not found" in capsys.readouterr().out


def test_waiting_polls_until_the_job_ends(fake_scontrol, monkeypatch, capsys):
    states = iter(["PENDING", "RUNNING", "RUNNING", "REQUEUED", "COMPLETED"])
    out = fake_scontrol / "scontrol.out"

    def sleep(_s):
        out.write_text(f"JobId=7 JobState={next(states)} ExitCode=0:0\n")

    sleep(0)
    monkeypatch.setattr("moe.launch.cluster.time.sleep", sleep)
    assert wait_for_job("7", poll_s=1) is True
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in lines] == ["PENDING", "RUNNING", "REQUEUED", "COMPLETED"]  # changes only
    with pytest.raises(StopIteration):
        next(states)
