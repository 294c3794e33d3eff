"""A real single-node Slurm for tests and CI: munged, slurmctld and slurmd on this machine, as root.

    python tests/integration/slurm_cluster.py start    # idempotent; prints `export SLURM_CONF=...`
    python tests/integration/slurm_cluster.py stop     # stops the daemons this helper started
    python tests/integration/slurm_cluster.py status

The cluster is private to the helper: its slurm.conf, state, spool, pid and log files live under
$MOR_DS_SLURM_DIR (default /tmp/mor-ds-slurm) and the daemons listen on their own ports, so a system
Slurm (if any) is neither used nor touched. Clients find it through SLURM_CONF, which `ensure_cluster()`
sets in os.environ (sbatch exports it into jobs).

Start order matters (cpu-stack-notes): munged first as the munge user, then `slurmctld -c`, then
`slurmd -N localhost`; the node is ready when `scontrol show node localhost` reports State=IDLE.
A munged that already answers `munge -n` is reused and left running.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

NODE = "localhost"
PARTITION = "debug"
CTLD_PORT = 16817
SLURMD_PORT = 16818
BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "srun")
MUNGE_SOCKET_DIR = Path("/run/munge")


class ClusterUnavailable(RuntimeError):
    """Slurm cannot run here (binaries missing, not root); the message says which."""


def cluster_dir() -> Path:
    return Path(os.environ.get("MOR_DS_SLURM_DIR", "/tmp/mor-ds-slurm"))


def slurm_conf_text(root: Path, cpus: int) -> str:
    return f"""\
# written by tests/integration/slurm_cluster.py: a one-node test cluster
ClusterName=morcluster
SlurmctldHost={NODE}
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# the main scheduling loop runs every second (default 60 s): a requeued job starts as soon as it is eligible
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
# finished jobs stay visible to `scontrol show job` for 10 min (no accounting database here)
MinJobAge=600
KillWait=30
# requeued jobs wait cred_expire seconds before they may start again (default 120)
AuthInfo=cred_expire=5
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    root: Path
    conf: Path
    partition: str = PARTITION
    started: tuple[str, ...] = ()  # daemons this call started (empty: the cluster was already up)

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def scontrol(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, env={**os.environ, **self.env})
        if check and proc.returncode:
            raise RuntimeError(f"scontrol {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout


def _wait(predicate, what: str, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tail = ""
            if log and log.exists():
                tail = " | " + " | ".join(log.read_text(errors="replace").splitlines()[-5:])
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(0.1)


def _ok(*cmd: str, env: dict[str, str] | None = None, stdin: str | None = None) -> bool:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, input=stdin, env={**os.environ, **(env or {})})
    return proc.returncode == 0


def _munge_works() -> bool:
    proc = subprocess.run(["munge", "-n"], capture_output=True)
    return proc.returncode == 0 and _ok("unmunge", stdin=proc.stdout.decode())


def _pid_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, IndexError, ProcessLookupError, PermissionError):
        return False
    return True


def _node_state(env: dict[str, str]) -> str:
    proc = subprocess.run(["scontrol", "show", "node", NODE], capture_output=True, text=True, env={**os.environ, **env})
    match = re.search(r"State=(\S+)", proc.stdout)
    return match.group(1) if match else ""


def _check_runnable() -> None:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        raise ClusterUnavailable(f"Slurm/munge binaries not installed ({', '.join(missing)}); "
                                 "apt-get install --no-install-recommends slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        raise ClusterUnavailable("starting slurmctld/slurmd/munged needs root (this test cluster runs them as root)")


def _daemon(cmd: list[str], env: dict[str, str]) -> None:
    """Run a self-daemonizing command. Its stderr goes to a file: a pipe would stay open (and block us)
    until the daemon closes its inherited descriptors, seconds later."""
    err = cluster_dir() / f"{Path(cmd[0]).name}-{Path(cmd[-1]).name}.stderr"
    with err.open("w") as stderr:
        code = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr).returncode
    if code:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {code}): {err.read_text().strip()}")


def _start_munge(started: list[str]) -> None:
    if _munge_works():
        return
    munge = pwd.getpwnam("munge")
    MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    for path in (MUNGE_SOCKET_DIR, Path("/var/lib/munge"), Path("/var/log/munge")):
        if path.exists():
            os.chown(path, munge.pw_uid, munge.pw_gid)
    _daemon(["runuser", "-u", "munge", "--", "munged", "--force"], dict(os.environ))
    started.append("munged")
    _wait(_munge_works, "munged to answer `munge -n`", 20)


def ensure_cluster(timeout: float = 60.0) -> Cluster:
    """Start (or reuse) the test cluster and set SLURM_CONF in os.environ; ClusterUnavailable if it cannot run."""
    root = cluster_dir()
    conf = root / "slurm.conf"
    cluster = Cluster(root=root, conf=conf)
    # (scontrol retries for ~10 s when no controller answers: look at the pid file first)
    if _pid_alive(root / "slurmctld.pid") and _node_state(cluster.env).startswith(("IDLE", "MIXED", "ALLOCATED")):
        os.environ.update(cluster.env)
        return cluster
    _check_runnable()
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf.write_text(slurm_conf_text(root, cpus=max(2, os.cpu_count() or 2)))
    started_file = root / "started.json"
    started: list[str] = json.loads(started_file.read_text()) if started_file.exists() else []
    _start_munge(started)
    env = {**os.environ, **cluster.env}
    if not _pid_alive(root / "slurmctld.pid"):
        _daemon(["slurmctld", "-c", "-f", str(conf)], env)
        started.append("slurmctld")
    _wait(lambda: _ok("scontrol", "ping", env=cluster.env), "slurmctld to answer `scontrol ping`", timeout,
          root / "slurmctld.log")
    if not _pid_alive(root / "slurmd.pid"):
        _daemon(["slurmd", "-N", NODE, "-f", str(conf)], env)
        started.append("slurmd")
    started_file.write_text(json.dumps(sorted(set(started))))
    _wait(lambda: _node_state(cluster.env).startswith("IDLE"), f"node {NODE} to become IDLE", timeout,
          root / "slurmd.log")
    os.environ.update(cluster.env)
    return dataclasses.replace(cluster, started=tuple(started))


def _stop_pid(pid_file: Path, timeout: float = 30.0) -> None:
    if not _pid_alive(pid_file):
        return
    pid = int(pid_file.read_text().split()[0])
    os.kill(pid, signal.SIGTERM)

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    _wait(gone, f"pid {pid} ({pid_file.name}) to exit", timeout)


def stop_cluster() -> None:
    """Stop the daemons this helper started (slurmd, slurmctld, then munged if it started it)."""
    root = cluster_dir()
    started_file = root / "started.json"
    started = json.loads(started_file.read_text()) if started_file.exists() else []
    _stop_pid(root / "slurmd.pid")
    _stop_pid(root / "slurmctld.pid")
    if "munged" in started:
        _stop_pid(MUNGE_SOCKET_DIR / "munged.pid")
    started_file.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    action = argv[1] if len(argv) > 1 else "status"
    if action == "start":
        try:
            cluster = ensure_cluster()
        except ClusterUnavailable as exc:
            print(f"slurm_cluster: {exc}", file=sys.stderr)
            return 1
        print(f"export SLURM_CONF={cluster.conf}")
    elif action == "stop":
        stop_cluster()
    elif action == "status":
        conf = cluster_dir() / "slurm.conf"
        state = _node_state({"SLURM_CONF": str(conf)}) if _pid_alive(cluster_dir() / "slurmctld.pid") else ""
        print(f"node {NODE}: {state or 'down'} (SLURM_CONF={conf})")
        return 0 if state else 1
    else:
        print(f"usage: {argv[0]} start|stop|status", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
