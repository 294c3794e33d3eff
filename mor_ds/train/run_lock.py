"""One training at a time per run directory: rank 0 holds RUN_DIR/train.lock for the whole run.

The lock is a file created with O_EXCL (atomic on NFS, Lustre and GPFS alike, where flock may be node-local or
missing) that names its holder: host, pid, the process's start time, Slurm job id and restart count, when it
started. A heartbeat thread touches it every HEARTBEAT_S. Another start into the same directory is refused naming
the holder. A lock left behind by a run that died without releasing it (kill -9, a lost node) is stale, and the next
start takes it over and says so, when
  - its host is this host and the pid is gone, belongs to another process (another start time) or the host rebooted;
  - it belongs to an earlier start of this very Slurm job (a requeue after a node failure: same job id, lower
    restart count);
  - its heartbeat is older than STALE_AFTER_S (any host: the holder is dead or hung).
Deciding and taking over happen under a short flock on a guard file, so two starts that both find a stale lock do not
both take it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock

from mor_ds.train.faults import EXIT_CONFIG, TrainingAborted

LOCK_FILE = "train.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
_GUARD_TIMEOUT_S = 60.0


class RunDirError(TrainingAborted):
    """The run directory cannot be used: not a directory, not writable, or held by another training."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_CONFIG)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); "" where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    process_start: str
    boot_id: str
    job_id: str  # SLURM_JOB_ID, "" outside Slurm
    restart: int  # SLURM_RESTART_COUNT: 0, then 1, 2, … after each requeue of the same job
    started: float
    nonce: str = field(default_factory=lambda: secrets.token_hex(8))

    @classmethod
    def this_process(cls) -> LockHolder:
        pid = os.getpid()
        return cls(host=socket.gethostname(), pid=pid, process_start=_process_start(pid), boot_id=_boot_id(),
                   job_id=os.environ.get("SLURM_JOB_ID", ""), restart=int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                   started=time.time())

    def describe(self) -> str:
        job = ""
        if self.job_id:
            job = f", Slurm job {self.job_id}" + (f" (restart {self.restart})" if self.restart else "")
        since = datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds")
        return f"pid {self.pid} on {self.host}{job}, started {since}"

    def stale_because(self, me: LockHolder, heartbeat_age: float) -> str | None:
        """Why this holder is certainly gone (as seen from `me`), or None if it may still run."""
        if self.host == me.host:
            if self.boot_id and me.boot_id and self.boot_id != me.boot_id:
                return "the host rebooted since"
            if not _pid_alive(self.pid):
                return "that process is gone"
            if self.process_start and _process_start(self.pid) != self.process_start:
                return "that pid now belongs to another process"
        if self.job_id and self.job_id == me.job_id and self.restart < me.restart:
            return f"it is an earlier start of this Slurm job (restart {self.restart}, this is restart {me.restart})"
        if heartbeat_age > STALE_AFTER_S:
            return f"no heartbeat for {heartbeat_age:.0f} s"
        return None


class RunLock:
    """A held run lock: heartbeats until released."""

    def __init__(self, path: Path, holder: LockHolder, took_over: str = "", created_dir: bool = False):
        self.path = path
        self.holder = holder
        self.took_over = took_over  # what was said about the stale lock replaced, "" if there was none
        self.created_dir = created_dir  # the run directory did not exist before this lock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="mor-ds-run-lock", daemon=True)
        self._thread.start()

    def _held(self) -> bool:
        try:
            holder = _read(self.path)
        except FileNotFoundError:
            return False
        return holder is not None and holder.nonce == self.holder.nonce

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self._held():
                    print(f"[mor-ds] warning: {self.path} no longer names this run (removed or taken over); "
                          f"another training may write into {self.path.parent}", flush=True)
                    return
                os.utime(self.path)
            except OSError:
                continue  # a transient filesystem error; the next beat retries

    def release(self, remove_new_dir: bool = False) -> None:
        """Stop the heartbeat and remove the lock; with `remove_new_dir` also the run directory, if this lock
        created it and it is empty again (a run that failed to start leaves no trace)."""
        self._stop.set()
        self._thread.join()
        if self._held():
            self.path.unlink(missing_ok=True)
        if remove_new_dir and self.created_dir:
            try:
                self.path.parent.rmdir()
            except OSError:  # something else was written there meanwhile: keep it
                pass


def _read(path: Path) -> LockHolder | None:
    """The holder recorded in a lock file; None if it is empty or garbled (a start killed while writing it)."""
    try:
        return LockHolder(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None


def _create(path: Path, holder: LockHolder) -> bool:
    """Create the lock file naming `holder`; False if it already exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(holder), f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def acquire(run_dir: str | os.PathLike) -> RunLock:
    """Take RUN_DIR's lock for this process (rank 0 of a training), taking over a stale one; a one-line RunDirError
    if the directory is a file, cannot be created or written, or another live training holds it."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    me = LockHolder.this_process()
    created = not run_dir.exists()
    try:
        if not created and not run_dir.is_dir():
            raise RunDirError(f"--run-dir {run_dir}: exists and is not a directory")
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"--run-dir {run_dir}: cannot create it ({exc.strerror}: {exc.filename})") from None
    try:
        if _create(path, me):
            return RunLock(path, me, created_dir=created)
        with FileLock(f"{run_dir}/.{LOCK_FILE}.guard", timeout=_GUARD_TIMEOUT_S):
            return _take_over(path, me)
    except OSError as exc:
        raise RunDirError(f"--run-dir {run_dir}: not writable ({exc.strerror}: {exc.filename})") from None


def _take_over(path: Path, me: LockHolder) -> RunLock:
    """Under the guard: the lock exists (or did a moment ago); take it if its holder is gone."""
    while True:
        if _create(path, me):  # released meanwhile
            return RunLock(path, me)
        try:
            holder = _read(path)
            age = time.time() - path.stat().st_mtime
            break
        except FileNotFoundError:
            continue
    if holder is None:
        if age <= HEARTBEAT_S:  # may be a start that is writing its record right now
            raise RunDirError(f"--run-dir {path.parent}: another training is starting (lock {path} written "
                              f"{age:.0f} s ago); try again, or delete {path} if no training runs there")
        reason, said = f"it is unreadable and {age:.0f} s old", f"the unreadable lock {path}"
    else:
        reason = holder.stale_because(me, age)
        if reason is None:
            raise RunDirError(
                f"--run-dir {path.parent}: in use by another training ({holder.describe()}; lock {path}, heartbeat "
                f"{age:.0f} s ago); use another --run-dir, or if that run is dead delete {path} (a lock with no "
                f"heartbeat for {STALE_AFTER_S:.0f} s is taken over)")
        said = f"the stale lock {path} of {holder.describe()}"
    path.unlink()
    if not _create(path, me):
        raise RunDirError(f"--run-dir {path.parent}: another training took {path} while this one replaced a stale "
                          f"lock; try again")
    return RunLock(path, me, took_over=f"took over {said}: {reason}")

