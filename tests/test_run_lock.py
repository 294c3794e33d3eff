"""The run directory lock: one training per run dir, the holder named, stale locks recognised and taken over.
Two real trainings into one directory are in tests/integration/test_train_deepspeed.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mor_ds.train import run_lock
from mor_ds.train.faults import EXIT_CONFIG
from mor_ds.train.run_lock import LOCK_FILE, STALE_AFTER_S, RunDirError, acquire


def _write_lock(run_dir, **fields) -> None:
    """A lock file as another process would have left it (this host, a live pid, unless `fields` say otherwise)."""
    me = run_lock.LockHolder.this_process()
    record = {**me.__dict__, "nonce": "0123456789abcdef", **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps(record) + "\n")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    lock = acquire(tmp_path / "run")
    record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid()) and record["started"] <= time.time()
    assert lock.took_over == ""
    with pytest.raises(RunDirError) as err:
        acquire(tmp_path / "run")  # a second start, here from the same process
    assert err.value.exit_code == EXIT_CONFIG
    message = str(err.value)
    assert message.startswith(f"--run-dir {tmp_path / 'run'}: in use by another training (pid {os.getpid()} on "
                              f"{socket.gethostname()}, started ")
    assert f"lock {tmp_path / 'run' / LOCK_FILE}, heartbeat 0 s ago); use another --run-dir" in message
    lock.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    acquire(tmp_path / "run").release()  # free again


def test_slurm_job_and_restart_are_recorded_and_named(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    lock = acquire(tmp_path)
    try:
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert (record["job_id"], record["restart"]) == ("4242", 2)
        with pytest.raises(RunDirError, match=r"\(pid \d+ on [^,]+, Slurm job 4242 \(restart 2\), started "):
            acquire(tmp_path)
    finally:
        lock.release()


@pytest.mark.parametrize("case", ["dead pid", "pid reused", "rebooted", "requeued", "no heartbeat", "garbled"])
def test_a_stale_lock_is_taken_over_saying_why(tmp_path, monkeypatch, case):
    if case == "dead pid":
        _write_lock(tmp_path, pid=_dead_pid())
        why = "that process is gone"
    elif case == "pid reused":  # the pid is alive but started at another time: not the process that locked
        _write_lock(tmp_path, process_start="1")
        why = "that pid now belongs to another process"
    elif case == "rebooted":
        _write_lock(tmp_path, boot_id="another-boot")
        why = "the host rebooted since"
    elif case == "requeued":  # Slurm restarted this job (on another node, after a node failure)
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        _write_lock(tmp_path, host="gpu-node-17", job_id="77", restart=0)
        why = "it is an earlier start of this Slurm job (restart 0, this is restart 1)"
    elif case == "no heartbeat":  # another host, silent for longer than STALE_AFTER_S
        _write_lock(tmp_path, host="gpu-node-17")
        old = time.time() - STALE_AFTER_S - 20
        os.utime(tmp_path / LOCK_FILE, (old, old))
        why = f"no heartbeat for {STALE_AFTER_S + 20:.0f} s"
    else:  # a start killed between creating the file and writing it, long ago
        (tmp_path / LOCK_FILE).write_text('{"host": "gpu-n')
        old = time.time() - 100
        os.utime(tmp_path / LOCK_FILE, (old, old))
        why = "it is unreadable and 100 s old"
    lock = acquire(tmp_path)
    try:
        assert lock.took_over.startswith("took over the ")
        assert lock.took_over.endswith(f": {why}")
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_live_lock_of_another_host_is_kept_until_its_heartbeat_is_stale(tmp_path):
    _write_lock(tmp_path, host="gpu-node-17", pid=4321, job_id="99")
    recent = time.time() - STALE_AFTER_S + 30
    os.utime(tmp_path / LOCK_FILE, (recent, recent))
    with pytest.raises(RunDirError, match=r"in use by another training \(pid 4321 on gpu-node-17, Slurm job 99, "):
        acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == 4321  # untouched


def test_a_lock_taken_over_is_not_released_by_its_former_holder(tmp_path):
    lock = acquire(tmp_path)
    _write_lock(tmp_path, host="gpu-node-17", pid=4321)  # e.g. judged stale elsewhere and replaced
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == 4321


def test_an_unusable_run_dir_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(RunDirError, match=rf"^--run-dir {tmp_path}/file: exists and is not a directory$"):
        acquire(tmp_path / "file")
    with pytest.raises(RunDirError, match=rf"^--run-dir {tmp_path}/file/run: cannot create it \(Not a directory"):
        acquire(tmp_path / "file" / "run")
    with tempfile.TemporaryDirectory() as reachable:  # pytest's tmp_path is private to its user
        os.chmod(reachable, 0o755)
        locked = Path(reachable) / "read-only"
        locked.mkdir(mode=0o555)
        read, write = os.pipe()
        child = os.fork()  # root ignores permissions: the child drops to an unprivileged user first
        if child == 0:
            try:
                if os.geteuid() == 0:
                    os.setuid(65534)
                acquire(locked)
                os.write(write, b"acquired")
            except RunDirError as exc:
                os.write(write, str(exc).encode())
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(child, 0)
        with os.fdopen(read) as f:
            assert f.read() == f"--run-dir {locked}: not writable (Permission denied: {locked / LOCK_FILE})"
