"""What produced a run: the code (mor-ds version, git commit) and, per start, what it read and how it was launched.

Training writes one record per start to RUN_DIR/provenance.json (`{"starts": [...]}`), puts the record of the
start that wrote it into every checkpoint's COMPLETE marker, and logs it to W&B under `provenance`. The data part
comes from the trainer's data side (`mor_ds.train.data`): shard directory, the SHA-256 of its index.json, the
index's own record of the source it was prepared from, and the tokenizer's file hash and identity.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from functools import cache
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

PROVENANCE_FILE = "provenance.json"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@cache
def code_version() -> dict[str, Any]:
    """mor-ds's version and commit: from the git checkout the package is imported from, else from the installed
    distribution's metadata (`pip install git+…` records the commit in direct_url.json)."""
    out: dict[str, Any] = {"mor_ds": "unknown", "python": platform.python_version()}
    try:
        dist = distribution("mor-ds")
        out["mor_ds"] = dist.version
    except PackageNotFoundError:
        dist = None
    if (PACKAGE_ROOT / ".git").exists():
        commit = _git("rev-parse", "HEAD")
        if commit:
            out["git_commit"] = commit
            out["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
            return out
    if dist is not None:
        try:
            direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
        except ValueError:
            direct_url = {}
        commit = direct_url.get("vcs_info", {}).get("commit_id")
        if commit:
            out["git_commit"] = commit
    return out


def libraries() -> dict[str, str]:
    from data_pipeline.prepare import installed_versions

    return installed_versions(("torch", "deepspeed", "wandb", "datasets", "sentencepiece", "tokenizers"))


def start_record(*, step: int, world_size: int, data: dict[str, Any], resumed_from: str | None,
                 changes: dict[str, list[Any]] | None = None) -> dict[str, Any]:
    """The provenance of one start of a run (JSON)."""
    return {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "step": step,
            "resumed_from": resumed_from, "changes": changes or {}, "code": code_version(), "libraries": libraries(),
            "data": data, "world_size": world_size, "host": socket.gethostname(), "cwd": os.getcwd(),
            "command": sys.argv, "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def read_provenance(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / PROVENANCE_FILE
    if not path.is_file():
        return []
    return json.loads(path.read_text())["starts"]


def append_start(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Add one start to RUN_DIR/provenance.json (atomically: a reader sees the old or the new file)."""
    path = Path(run_dir) / PROVENANCE_FILE
    starts = read_provenance(run_dir) + [record]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    tmp.write_text(json.dumps({"starts": starts}, indent=1) + "\n")
    os.replace(tmp, path)
