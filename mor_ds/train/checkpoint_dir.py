"""Checkpoint directory layout, atomic commit, checksums, keep-last-K, and resume resolution.

    RUN_DIR/checkpoints/
        step_00000100/           one DeepSpeed checkpoint (model states + ZeRO shards of every rank)
            COMPLETE             written by rank 0 after every rank finished writing (DeepSpeed barriers): JSON
                                 with the step, config, counters and every file's size and xxh3-128 digest
            CORRUPT              instead of COMPLETE: a checkpoint whose files failed their checksums on resume
            universal/           the same state in DeepSpeed's universal layout, written when a run resumes it on
                                 another number of processes (its own COMPLETE inside); pruned with the checkpoint
        latest                   the tag of the newest COMPLETE checkpoint, replaced atomically (os.replace)

A save that dies half-way leaves a tag directory without COMPLETE: it is never `latest`, resume skips it and
the next save of that tag starts from an empty directory. A save that fails (disk full) is removed and the run
stops, the previous checkpoint untouched. Resume checks the files against their digests (each rank the shards it
wrote, so the cost is one read of a rank's own files, in parallel) and falls back to the newest intact checkpoint,
saying which file failed. `latest` is DeepSpeed's own file name, so its tools (zero_to_fp32.py) work on the
directory as usual.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from data_pipeline.files import DIGEST, file_digest
from mor_ds import distributed
from mor_ds.train.faults import EXIT_SAVE_FAILED, TrainingAborted

COMPLETE = "COMPLETE"
CORRUPT = "CORRUPT"
LATEST = "latest"
UNIVERSAL = "universal"
_TAG = re.compile(r"^step_(\d+)$")
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank shard names (optimizer, ZeRO-3 weights)
_NEARLY_FULL = 64 << 20  # bytes free below which a failed write is reported as a full disk


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


def newest_first(root: Path) -> list[CheckpointRef]:
    """The complete checkpoints under `root` in the order resume tries them: `latest`'s, then by step, newest first."""
    done = complete_checkpoints(root)[::-1]
    latest = latest_checkpoint(root)
    return ([latest] + [r for r in done if r.tag != latest.tag]) if latest else done


def checkpoint_meta(ref: CheckpointRef) -> dict[str, Any]:
    """The COMPLETE marker's JSON: step, time, config, counters, file digests."""
    return json.loads((ref.path / COMPLETE).read_text())


def _checked_by(name: str, rank: int, world_size: int) -> bool:
    """Whether `rank` digests or verifies file `name` of a checkpoint: a ZeRO shard goes to the rank that wrote it
    (modulo the world size, which may differ from the saving run's), anything else to rank 0."""
    match = _RANK_FILE.search(name)
    return (int(match[1]) if match else 0) % world_size == rank


def digest_files(path: Path, rank: int = 0, world_size: int = 1) -> dict[str, dict[str, Any]]:
    """{relative path: {bytes, digest}} of this rank's share of the files of checkpoint directory `path`."""
    out = {}
    for file in sorted(f for f in path.rglob("*") if f.is_file() and f.name not in (COMPLETE, CORRUPT)):
        name = file.relative_to(path).as_posix()
        if _checked_by(name, rank, world_size):
            out[name] = {"bytes": file.stat().st_size, DIGEST: file_digest(file)}
    return out


def verify_checkpoint(ref: CheckpointRef, rank: int = 0, world_size: int = 1) -> list[str]:
    """Problems of this rank's share of the checkpoint's files against the digests in COMPLETE, one line each
    naming the file; empty when intact (or when COMPLETE records no digests: a checkpoint of an older mor-ds)."""
    try:
        files = checkpoint_meta(ref).get("files", {})
    except (OSError, ValueError) as exc:
        return [f"{ref.path / COMPLETE}: unreadable ({exc})"]
    problems = []
    for name, want in files.items():
        if not _checked_by(name, rank, world_size):
            continue
        path = ref.path / name
        try:
            size = path.stat().st_size
            if size != want["bytes"]:
                problems.append(f"{path}: {size} bytes, {want['bytes']} when saved (truncated or replaced)")
            elif file_digest(path) != want[DIGEST]:
                problems.append(f"{path}: content differs from its {DIGEST} digest (corrupt)")
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror.lower()}")
    return problems


def mark_corrupt(ref: CheckpointRef, problems: list[str]) -> None:
    """Replace COMPLETE by CORRUPT (the problems added), so no resume, eval or export takes it again; the files
    stay for inspection and the next save of this step replaces the directory."""
    meta = json.loads((ref.path / COMPLETE).read_text())
    _write_atomic(ref.path / CORRUPT, json.dumps({**meta, "problems": problems}) + "\n")
    (ref.path / COMPLETE).unlink()


def intact_checkpoint(spec: str | os.PathLike) -> CheckpointRef:
    """`resolve_checkpoint(spec)`, refused with a one-line CheckpointError naming the file when its files fail
    their checksums (for eval and export: a damaged checkpoint must not be read as if it were the model)."""
    ref = resolve_checkpoint(spec)
    problems = verify_checkpoint(ref)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"checkpoint {ref.path} is damaged: {problems[0]}{more}")
    return ref


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


def universal_checkpoint(ref: CheckpointRef, is_main: bool) -> CheckpointRef:
    """`ref` in DeepSpeed's universal layout, which any world size loads: converted once by rank 0 into
    `ref.path/universal/` (atomically: a temporary directory renamed once COMPLETE is in it), reused after.
    Collective; a failed conversion raises CheckpointError on every rank."""
    out = CheckpointRef(ref.path, UNIVERSAL)
    error = ""
    if is_main and not is_complete(out.path):
        tmp = ref.path / f".{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        log = tmp / "convert.log"
        try:
            distributed.convert_to_universal(ref.path, tmp, log)
        except Exception as exc:  # DeepSpeed's converter asserts and raises many types; all end here as one line
            error = (f"checkpoint {ref.path}: cannot convert it to DeepSpeed's universal layout to resume on another "
                     f"number of processes ({type(exc).__name__}: {exc}); DeepSpeed's output is in {log}")
        else:
            _write_atomic(tmp / COMPLETE, json.dumps({"source": ref.tag, "time": time.time()}) + "\n")
            shutil.rmtree(out.path, ignore_errors=True)
            os.replace(tmp, out.path)
    error = distributed.broadcast_object(error)
    if error:
        raise CheckpointError(error)
    return out


class CheckpointManager:
    """Saves through the engine, commits atomically with the files' digests and keeps the newest `keep_last`
    complete checkpoints; finds the newest intact one to resume from."""

    def __init__(self, run_dir: Path, keep_last: int, env: distributed.DistEnv,
                 before_commit: Callable[[int], None] | None = None):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.env = env
        self.is_main = env.is_main
        self.before_commit = before_commit  # fault-injection hook (tests of torn writes)

    def latest(self) -> CheckpointRef | None:
        return latest_checkpoint(self.root)

    def save(self, engine: distributed.TrainEngine, step: int, client_state: dict[str, Any],
             meta: dict[str, Any] | None = None, prune: bool = True) -> CheckpointRef:
        """Collective. Returns once the checkpoint is complete and `latest` points at it. `meta` (JSON: the run's
        config, counters) goes into COMPLETE, so readers need neither DeepSpeed nor the run directory. `prune`:
        drop checkpoints beyond keep_last. A failed write (on any rank) removes the partial directory and raises
        TrainingAborted(EXIT_SAVE_FAILED) on every rank; the previous checkpoint stays `latest`."""
        ref = CheckpointRef(self.root, step_tag(step))
        previous = self.latest()
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if ref.path.exists():  # a torn earlier attempt at this step, or a re-run after resume
                shutil.rmtree(ref.path)
        distributed.barrier()
        error, files = "", {}
        try:
            engine.save(self.root, ref.tag, client_state)  # ends with a barrier: every rank has written
            files = digest_files(ref.path, self.env.rank, self.env.world_size)  # each rank its own shards
        except (OSError, RuntimeError) as exc:
            error = _write_failure(exc, self.root)
        shares = distributed.all_gather_object((error, files))
        errors = [f"rank {rank}: {err}" for rank, (err, _) in enumerate(shares) if err]
        if not errors:
            if self.before_commit is not None:
                self.before_commit(step)
            if self.is_main:
                record = {"step": step, "time": time.time(), **(meta or {}),
                          "files": {k: v for _, part in shares for k, v in part.items()}}
                try:
                    _write_atomic(ref.path / COMPLETE, json.dumps(record) + "\n")
                    _write_atomic(self.root / LATEST, ref.tag)
                except OSError as exc:
                    errors = [f"rank 0: {_write_failure(exc, self.root)}"]
            errors = distributed.broadcast_object(errors)
        if errors:
            if self.is_main:
                (ref.path / COMPLETE).unlink(missing_ok=True)
                shutil.rmtree(ref.path, ignore_errors=True)  # frees what the partial files took
            distributed.barrier()
            kept = f"the previous checkpoint {previous.path} is intact and stays latest" if previous else \
                "there is no earlier checkpoint"
            raise TrainingAborted(f"saving checkpoint {ref.path} failed ({'; '.join(errors)}); removed the partial "
                                  f"{ref.tag}, {kept}", EXIT_SAVE_FAILED)
        if self.is_main and prune:
            self._prune(keep=ref)
        distributed.barrier()
        return ref

    def first_intact(self, candidates: list[CheckpointRef], fallback: bool) -> CheckpointRef | None:
        """Collective: the first of `candidates` (rank 0's list; None if it is empty) whose files match their
        digests. Each damaged one is named in one line and marked CORRUPT; without `fallback` it is an error."""
        candidates = distributed.broadcast_object(candidates)
        if not candidates:
            return None
        for number, ref in enumerate(candidates):
            shares = distributed.all_gather_object(verify_checkpoint(ref, self.env.rank, self.env.world_size))
            problems = [p for share in shares for p in share]
            if not problems:
                return ref
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            rest = candidates[number + 1:]
            if self.is_main:
                mark_corrupt(ref, problems)
                then = f"trying the next newest, {rest[0].tag}" if fallback and rest else "not resuming from it"
                print(f"[mor-ds] checkpoint {ref.path} is damaged: {problems[0]}{more}; marked it {CORRUPT}, "
                      f"{then}", flush=True)
            distributed.barrier()
            if not fallback:
                raise CheckpointError(f"checkpoint {ref.path} is damaged: {problems[0]}{more}")
        raise CheckpointError(f"no intact checkpoint under {self.root} (every one failed its checksums: see above); "
                              f"move them away to start the run over")

    def _prune(self, keep: CheckpointRef) -> None:
        """Drop complete checkpoints beyond keep_last and torn directories older than `keep`."""
        done = complete_checkpoints(self.root)
        for old in done[:-self.keep_last]:
            if old.tag != keep.tag:
                shutil.rmtree(old.path, ignore_errors=True)
        for path in self.root.iterdir():
            if path.is_dir() and _TAG.match(path.name) and not is_complete(path) and tag_step(path.name) < keep.step:
                shutil.rmtree(path, ignore_errors=True)


def _write_failure(exc: BaseException, directory: Path) -> str:
    """One line for a failed checkpoint write. torch.save's errors do not carry errno, so a nearly full filesystem
    is reported as such."""
    if isinstance(exc, OSError) and exc.errno:
        return f"{exc.strerror} ({errno.errorcode.get(exc.errno, exc.errno)}): {exc.filename or directory}"
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if free is not None and free < _NEARLY_FULL:
        return f"No space left on device (ENOSPC): {free >> 20} MiB free on the filesystem of {directory}"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
