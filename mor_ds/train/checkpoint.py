"""Checkpoint directory layout, atomic commit, keep-last-K, and resume resolution.

    RUN_DIR/checkpoints/
        step_00000100/           one DeepSpeed checkpoint (model states + ZeRO shards of every rank)
            COMPLETE             written by rank 0 after every rank finished writing (DeepSpeed barriers)
        latest                   the tag of the newest COMPLETE checkpoint, replaced atomically (os.replace)

A save that dies half-way leaves a tag directory without COMPLETE: it is never `latest`, resume skips it and
the next save of that tag starts from an empty directory. `latest` is DeepSpeed's own file name, so its tools
(zero_to_fp32.py) work on the directory as usual.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mor_ds import distributed

COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint path that cannot be resumed from (the message names it)."""


@dataclass(frozen=True)
class CheckpointRef:
    root: Path  # the directory holding tag directories (DeepSpeed's save_dir / load_dir)
    tag: str

    @property
    def path(self) -> Path:
        return self.root / self.tag

    @property
    def step(self) -> int:
        return tag_step(self.tag)


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def tag_step(tag: str) -> int:
    match = _TAG.match(tag)
    return int(match[1]) if match else -1


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[CheckpointRef]:
    """COMPLETE checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    refs = [CheckpointRef(root, p.name) for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)]
    return sorted((r for r in refs if is_complete(r.path)), key=lambda r: r.step)


def latest_checkpoint(root: Path) -> CheckpointRef | None:
    """The tag named by `latest` if it is complete, else the newest complete tag (a `latest` written by hand or
    by another tool may point at a torn directory)."""
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if tag and is_complete(root / tag):
            return CheckpointRef(root, tag)
    done = complete_checkpoints(root)
    return done[-1] if done else None


def checkpoint_meta(ref: CheckpointRef) -> dict[str, Any]:
    """The COMPLETE marker's JSON: step, time, config, counters."""
    return json.loads((ref.path / COMPLETE).read_text())


def resolve_checkpoint(spec: str | os.PathLike) -> CheckpointRef:
    """A checkpoint from a user path: a checkpoints root (its latest), a tag directory, or a run directory."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file or directory")
    if path.is_dir() and _TAG.match(path.name) or (path / COMPLETE).exists():
        if not is_complete(path):
            raise CheckpointError(f"checkpoint {path}: incomplete (no {COMPLETE} marker: the save was interrupted)")
        return CheckpointRef(path.parent, path.name)
    for root in (path, path / "checkpoints"):
        ref = latest_checkpoint(root)
        if ref is not None:
            return ref
    raise CheckpointError(f"checkpoint {path}: no complete checkpoint found (expected {path}/checkpoints/step_*/"
                          f"{COMPLETE} or a step_* directory)")


class CheckpointManager:
    """Saves through the engine, commits atomically and keeps the newest `keep_last` complete checkpoints."""

    def __init__(self, run_dir: Path, keep_last: int, is_main: bool,
                 before_commit: Callable[[int], None] | None = None):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.is_main = is_main
        self.before_commit = before_commit  # fault-injection hook (tests of torn writes)

    def latest(self) -> CheckpointRef | None:
        return latest_checkpoint(self.root)

    def save(self, engine: distributed.Engine, step: int, client_state: dict[str, Any],
             meta: dict[str, Any] | None = None) -> CheckpointRef:
        """Collective. Returns once the checkpoint is complete and `latest` points at it. `meta` (JSON: the run's
        config, counters) goes into COMPLETE, so readers need neither DeepSpeed nor the run directory."""
        ref = CheckpointRef(self.root, step_tag(step))
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if ref.path.exists():  # a torn earlier attempt at this step, or a re-run after resume
                shutil.rmtree(ref.path)
        distributed.barrier()
        engine.save(self.root, ref.tag, client_state)  # ends with a barrier: every rank has written
        if self.before_commit is not None:
            self.before_commit(step)
        if self.is_main:
            _write_atomic(ref.path / COMPLETE, json.dumps({"step": step, "time": time.time(), **(meta or {})}) + "\n")
            _write_atomic(self.root / LATEST, ref.tag)
            self._prune(keep=ref)
        distributed.barrier()
        return ref

    def _prune(self, keep: CheckpointRef) -> None:
        """Drop complete checkpoints beyond keep_last and torn directories older than `keep`."""
        done = complete_checkpoints(self.root)
        for old in done[:-self.keep_last]:
            if old.tag != keep.tag:
                shutil.rmtree(old.path, ignore_errors=True)
        for path in self.root.iterdir():
            if path.is_dir() and _TAG.match(path.name) and not is_complete(path) and tag_step(path.name) < keep.step:
                shutil.rmtree(path, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
