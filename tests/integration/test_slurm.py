"""`moe launch` on a real Slurm cluster: the two-node local cluster of launch/local_cluster.sh.

One process per node, CPU, gloo. Skipped, with the reason, when sinfo does not reach a controller with
two usable nodes. Every run shares one small config; the runs of one module share a data cache.
"""
import json
import os
import signal
import subprocess
import time

import pytest

from tests.helpers import run_moe
from tests.helpers import (PLANTED_SECRETS, files_containing, job_id_from, job_state, tail, train_losses,
                                   wait_for_steps, wait_job)

# one worker runs them all, in order: the local cluster has two nodes, and parallel jobs would queue
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("slurm")]

SHORT = 8  # steps compared with one process: MoE routing amplifies float reordering after ~10 steps
LONG = 80  # steps of the runs that get interrupted: long enough to signal one mid-run


def common(cache, steps):
    return ["experiments/debug_moe.yaml", f"train.steps={steps}", "train.log_every=1", "train.eval_every=0",
            "checkpoint.every=20", "train.global_batch_size=4", f"data.cache_dir={cache}"]


def two_node(cache, steps, name, *extra):
    """2 nodes x 1 process: micro-batch 2 each, the same global batch of 4 as one process with 4."""
    return ["launch", *common(cache, steps), "train.micro_batch_size=2", f"run.name={name}", *extra,
            "--nodes", "2", "--gpus-per-node", "1"]


@pytest.fixture(scope="module")
def cache(data_cache):
    return data_cache  # the session's (the cluster's nodes are this machine)


@pytest.fixture(scope="module")
def uninterrupted(slurm, module_workdir, cache):
    """The reference for the interrupted runs: LONG steps on 2 nodes, with planted secrets in the env."""
    out = run_moe([*two_node(cache, LONG, "straight"), "--wait"], cwd=module_workdir, env_extra=PLANTED_SECRETS,
                  timeout=400)
    job = job_id_from(out.stdout)
    run = module_workdir / "runs" / "straight"
    assert job_state(job).get("JobState") == "COMPLETED", tail(run / "logs" / f"slurm-{job}.out")
    losses = train_losses(run)
    assert [s for s, _ in losses] == list(range(1, LONG + 1))
    return losses


def test_dry_run_submits_nothing(slurm, module_workdir, cache):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    out = run_moe([*two_node(cache, SHORT, "dry"), "--dry-run"], cwd=module_workdir)
    assert "#SBATCH --nodes=2" in out.stdout
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in out.stdout
    assert '--rdzv-endpoint="$MOE_HEAD_ADDR:$MOE_MASTER_PORT"' in out.stdout
    assert "export MOE_CONFIG=runs/dry/config.yaml" in out.stdout
    assert not (module_workdir / "runs" / "dry").exists()
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before


def test_unknown_partition_is_rejected(slurm, module_workdir, cache):
    proc = run_moe([*two_node(cache, SHORT, "badpart"), "--partition", "nosuch"], cwd=module_workdir, check=False)
    assert proc.returncode == 2 and "unknown partition" in proc.stderr and "debug" in proc.stderr
    assert not (module_workdir / "runs" / "badpart").exists()


def test_two_nodes_with_experts_across_nodes_equal_one_process(slurm, module_workdir, cache):
    """EP=2 over two nodes (each node holds 2 of the 4 experts) == one process holding all 4; then the
    saved script resubmitted as is, from another folder, runs again and resumes."""
    one = run_moe(["train", *common(cache, SHORT), "train.micro_batch_size=4", "run.name=one",
                   "logging.wandb.mode=disabled"], cwd=module_workdir)  # the reference curve only: no W&B run
    assert one.returncode == 0
    out = run_moe([*two_node(cache, SHORT, "two", "parallel.ep_size=2"), "--wait"], cwd=module_workdir, timeout=300)
    job = job_id_from(out.stdout)
    run = module_workdir / "runs" / "two"
    log = run / "logs" / f"slurm-{job}.out"
    assert job_state(job).get("JobState") == "COMPLETED", tail(log)
    assert "2 node(s) [node[1-2]] x 1 process(es)" in log.read_text()
    ref, got = train_losses(module_workdir / "runs" / "one"), train_losses(run)
    assert [s for s, _ in got] == [s for s, _ in ref] == list(range(1, SHORT + 1))
    for (_, a), (_, b) in zip(ref, got):
        assert abs(a - b) <= 1e-4 * abs(a), (ref, got)
    # per-rank log files, one folder per node
    assert list((run / "logs" / job / "restart_0" / "node0").rglob("stdout.log"))
    assert list((run / "logs" / job / "restart_0" / "node1").rglob("stdout.log"))

    resub = subprocess.run(["sbatch", "--parsable", str(run / "submit.sbatch")], cwd="/", capture_output=True,
                           text=True, check=True)
    job2 = resub.stdout.strip().split(";")[0]
    assert wait_job(job2, run / "logs" / f"slurm-{job2}.out").get("JobState") == "COMPLETED", \
        tail(run / "logs" / f"slurm-{job2}.out")
    assert f"resuming from step_{SHORT:08d}" in (run / "logs" / f"slurm-{job2}.out").read_text()
    assert train_losses(run) == got


def test_deepspeed_launcher_with_hostfile(slurm, module_workdir, cache):
    out = run_moe([*two_node(cache, SHORT, "ds"), "--launcher", "deepspeed", "--wait"], cwd=module_workdir,
                  timeout=300)
    job = job_id_from(out.stdout)
    run = module_workdir / "runs" / "ds"
    assert job_state(job).get("JobState") == "COMPLETED", tail(run / "logs" / f"slurm-{job}.out")
    assert (run / "logs" / job / "restart_0" / "hostfile").read_text() == "node1 slots=1\nnode2 slots=1\n"
    assert [s for s, _ in train_losses(run)] == list(range(1, SHORT + 1))
    assert list((run / "logs" / job / "restart_0").glob("node*/*_rank*.log"))


def test_preempted_job_checkpoints_requeues_and_finishes(slurm, module_workdir, cache, uninterrupted):
    out = run_moe(two_node(cache, LONG, "preempted"), cwd=module_workdir)
    job = job_id_from(out.stdout)
    run = module_workdir / "runs" / "preempted"
    log = run / "logs" / f"slurm-{job}.out"
    wait_for_steps(run, 5, job_log=log)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    final = wait_job(job, log)
    text = log.read_text()
    assert final.get("JobState") == "COMPLETED" and final.get("Restarts") == "1", text[-4000:]
    assert "on SIGUSR2; checkpoint saved" in text
    # the line after the requeue may miss the job's log (the requeue ends torchrun, which copies the
    # ranks' output there); rank 0's own log file has it
    rank_logs = "".join(p.read_text(errors="replace") for p in (run / "logs" / job).rglob("*.log"))
    assert f"requeued Slurm job {job}" in text + rank_logs
    stopped_at = int(text.split("stopped after step ")[1].split()[0])
    assert 5 <= stopped_at < LONG
    assert f"resuming from step_{stopped_at:08d}" in text
    losses = train_losses(run)
    assert [s for s, _ in losses] == list(range(1, LONG + 1))  # no step lost, none repeated
    assert losses == uninterrupted
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == LONG


def test_killed_worker_is_restarted_by_torchrun(slurm, module_workdir, cache, uninterrupted):
    out = run_moe([*two_node(cache, LONG, "killed"), "--max-restarts", "1"], cwd=module_workdir)
    job = job_id_from(out.stdout)
    run = module_workdir / "runs" / "killed"
    log = run / "logs" / f"slurm-{job}.out"
    deadline = time.time() + 180
    while not (run / "checkpoints" / "latest").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (run / "checkpoints" / "latest").exists(), tail(log)
    pid = _worker_pid(job, rank=1)
    os.kill(pid, signal.SIGKILL)
    final = wait_job(job, log)
    assert final.get("JobState") == "COMPLETED" and final.get("Restarts") == "0", tail(log)
    assert list((run / "logs" / job / "restart_0").rglob("attempt_1")), "torchrun did not restart the workers"
    assert "resuming from step_" in log.read_text()
    losses = train_losses(run)
    assert [s for s, _ in losses] == list(range(1, LONG + 1))
    assert losses == uninterrupted


def test_no_secret_is_written(slurm, module_workdir, cache, uninterrupted):
    """The uninterrupted job ran with fake secrets in its environment (it inherits them at run time):
    none is in its run folder (script, config, code snapshot, logs, W&B files, checkpoints)."""
    run = module_workdir / "runs" / "straight"
    assert (run / "wandb").exists() and (run / "submit.sbatch").exists() and list((run / "code").iterdir())
    assert files_containing(str(run), PLANTED_SECRETS.values()) == {}
    dry = run_moe([*two_node(cache, SHORT, "secret_dry"), "--dry-run"], cwd=module_workdir, env_extra=PLANTED_SECRETS)
    assert not any(v in dry.stdout + dry.stderr for v in PLANTED_SECRETS.values())


def _worker_pid(job, rank, timeout=30):
    """The trainer process of a rank of a job on the local cluster (every node is this machine)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            if f"SLURM_JOB_ID={job}".encode() in env and f"RANK={rank}".encode() in env and b"moe.cli" in cmd \
                    and b"torch.distributed.run" not in cmd:
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} worker of job {job} found")


def test_sweep_runs_as_one_job_array(slurm, module_workdir, cache):
    """`moe sweep --slurm`: one array job trains every run; W&B sees the group and both x axes; a
    rerun submits nothing; the report has every run."""
    from tests.helpers import read_offline_run

    sweep = module_workdir / "arr.yaml"
    sweep.write_text("name: arr\nbase: experiments/debug_moe.yaml\n"
                     f"overrides: [train.steps=4, train.eval_every=2, train.log_every=2, data.cache_dir={cache}]\n"
                     "grid:\n  model.moe.top_k: [1, 2]\n")
    out = run_moe(["sweep", str(sweep), "--slurm", "--cpu", "--wait"], cwd=module_workdir, timeout=400)
    assert "2 finished, 0 failed" in out.stdout, out.stdout
    root = module_workdir / "runs" / "arr"
    runs = json.loads((root / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["finished", "finished"]
    assert len({r["job_id"] for r in runs}) == 1 and [r["task_id"] for r in runs] == [0, 1]
    assert job_state(runs[0]["job_id"]).get("JobState") == "COMPLETED"
    assert "[moe launch]" in (root / "logs" / f"slurm-{runs[1]['job_id']}_1.out").read_text()

    wb = read_offline_run(root / "top_k=2")
    assert wb["group"] == "arr" and wb["tags"] == ["top_k:2"] and wb["job_type"] == "train"
    assert wb["step_metrics"]["loss/*"] == "tokens" and wb["step_metrics"]["loss_vs_flops/*"] == "flops"
    assert {"loss/val", "loss_vs_flops/val", "tokens", "flops"} <= wb["history_keys"]

    again = run_moe(["sweep", str(sweep), "--slurm", "--cpu"], cwd=module_workdir)
    assert "nothing to submit" in again.stdout and "submitted job" not in again.stdout

    run_moe(["report", str(root), "--out", str(module_workdir / "arr_report")], cwd=module_workdir)
    md = (module_workdir / "arr_report" / "report.md").read_text()
    assert md.count("| 1/1 |") == 2 and "Failed" not in md
