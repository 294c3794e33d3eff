"""Submitting to and watching a test Slurm cluster (slurm_cluster.py): the environment a job gets, job fields and
states, and waits with deadlines (nothing sleeps to synchronise)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

DEADLINE = 240  # seconds for any one wait
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def job_env(**extra: str) -> dict[str, str]:
    """The environment sbatch exports into the job: ours minus any enclosing Slurm job's or launcher's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) or k == "SLURM_CONF"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", **extra)
    return env


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for(predicate, what: str, deadline: float = DEADLINE, log: Path | None = None):
    """Poll `predicate` until it returns something truthy (returned); TimeoutError with the log's tail."""
    end = time.monotonic() + deadline
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            tail = "\n".join(text(log).splitlines()[-30:]) if log else ""
            raise TimeoutError(f"timed out after {deadline} s waiting for {what}\n{tail}")
        time.sleep(0.2)


def job_field(job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(rf"\b{name}=(\S+)", out)
    return match.group(1) if match else ""


def finished(job: str) -> str:
    """The job's final state, or "" while it is pending or running."""
    state = job_field(job, "JobState")
    return state if state in FINAL_STATES else ""


def scontrol_requeue(job: str) -> None:
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"scontrol requeue {job}: {proc.stderr.strip()}")


def hostnames(nodelist: str) -> list[str]:
    """`node[1-2]` → ["node1", "node2"]."""
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                          text=True).stdout.split()
