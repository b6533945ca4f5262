"""What Slurm says about the cluster and its jobs, read only: partitions and their GPU GRES (`sinfo`),
the tasks of an array job still queued or running (`squeue`), job states (`scontrol show job`), and
waiting for a job to end. Without Slurm's commands each answers "cannot be asked" (None, {})."""
from __future__ import annotations

import shutil
import subprocess
import time
from typing import Dict, List, Optional, Tuple


def have(cmd: str) -> bool:
    return shutil.which(cmd) is not None


def slurm_partitions() -> Optional[List[str]]:
    """Partition names from `sinfo` (the default one without its `*`), or None without Slurm."""
    if not have("sinfo"):
        return None
    proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return None
    return sorted({p.strip().rstrip("*") for p in proc.stdout.split() if p.strip()})


def partition_has_gpus(partition: Optional[str]) -> Optional[bool]:
    """Whether the partition's nodes advertise GPU GRES; None when it cannot be asked."""
    if not have("sinfo"):
        return None
    cmd = ["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return None
    return "gpu" in proc.stdout


ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING")


def active_array_tasks(job_id: str) -> Dict[int, str]:
    """{array task id: state} of the tasks of array job `job_id` that are still queued or running
    (squeue lists only those); empty when the job has ended or Slurm cannot be asked."""
    if not have("squeue"):
        return {}
    proc = subprocess.run(["squeue", "-h", "-r", "-j", str(job_id), "-o", "%K %T"], capture_output=True, text=True,
                          timeout=60)
    out = {}
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        task, _, state = line.strip().partition(" ")
        if task.isdigit() and state in ACTIVE_STATES:
            out[int(task)] = state
    return out


def job_states(job_id: str) -> Dict[str, Tuple[str, str]]:
    """{job id: (state, exit code)} for the job (every task of an array), from scontrol."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    out = {}
    for line in proc.stdout.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "JobId" in fields:
            out[fields["JobId"]] = (fields.get("JobState", "?"), fields.get("ExitCode", "?"))
    return out


def wait_for_job(job_id: str, poll_s: float = 2.0) -> bool:
    """Block until the job (and a requeued job's next starts) has ended; True if it completed."""
    active = ACTIVE_STATES
    last = None
    while True:
        states = job_states(job_id)
        summary = ", ".join(f"{j} {s}" for j, (s, _) in sorted(states.items()))
        if summary != last:
            print(f"[moe launch] {time.strftime('%H:%M:%S')} {summary or 'job ' + job_id + ' not found'}", flush=True)
            last = summary
        if not states:
            return False
        if all(s not in active for s, _ in states.values()):
            return all(s == "COMPLETED" for s, _ in states.values())
        time.sleep(poll_s)
