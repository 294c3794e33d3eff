"""A real Slurm for tests and CI, as root: one node on this machine, or N "nodes" in network namespaces.

    python tests/integration/slurm_cluster.py start [--nodes N]   # idempotent; prints `export SLURM_CONF=...`
    python tests/integration/slurm_cluster.py stop [--nodes N]    # stops what this helper started
    python tests/integration/slurm_cluster.py status [--nodes N]
    python tests/integration/slurm_cluster.py exec --nodes N nodeK -- CMD [ARGS...]   # run CMD "on" nodeK
    python tests/integration/slurm_cluster.py fail --nodes N nodeK     # the node dies: network cut, processes killed
    python tests/integration/slurm_cluster.py revive --nodes N nodeK   # it comes back (slurmd restarted)

One node (the default): munged, slurmctld and `slurmd -N localhost` on this machine, everything under
$MOR_DS_SLURM_DIR (default /tmp/mor-ds-slurm), ports 16817/16818.

N nodes (N >= 2), under $MOR_DS_SLURM_DIR-Nnodes, ports 16917/16918: node K is a network namespace `mords-nodeK`
with address 10.77.0.(10+K) on a veth pair to the bridge `mords-br0` (10.77.0.1 in this namespace); the /24 exists
only on that bridge and the namespaces have no other route, so no packet leaves for any other address. Each node's
slurmd (and whatever it starts: job steps, training ranks) also runs in its own UTS namespace with hostname nodeK
and its own mount namespace, where a shared hosts file resolves node1..nodeN. The file system is the machine's, as
a cluster's shared file system would be. slurmctld runs here, listening on 10.77.0.1; munged is shared. Every
slurmd has its own spool, pid and log file (`%n` in slurm.conf), named by `slurmd -N nodeK`. Set
MOR_DS_SLURM_SUBNET (default 10.77.0) if that /24 is in use on this machine.

Clients find a cluster through SLURM_CONF, which `ensure_cluster()` sets in os.environ (sbatch exports it into jobs).
Start order matters (cpu-stack-notes): munged first as the munge user, then `slurmctld -c`, then the slurmds; a node
is ready when `scontrol show node` reports State=IDLE. A munged that already answers `munge -n` is reused and left
running.
"""

from __future__ import annotations

import argparse
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

PARTITION = "debug"
BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "srun")
NAMESPACE_BINARIES = ("ip", "nsenter", "unshare", "mount", "hostname")
MUNGE_SOCKET_DIR = Path("/run/munge")
BRIDGE = "mords-br0"
NODE_CPUS = 4  # each namespace node claims 4 CPUs (config_overrides): a 2x2 job, or two 1x2 jobs, per node


class ClusterUnavailable(RuntimeError):
    """Slurm cannot run here (binaries missing, not root, subnet taken); the message says which."""


def subnet() -> str:
    """The first three octets of the namespace nodes' /24."""
    return os.environ.get("MOR_DS_SLURM_SUBNET", "10.77.0")


@dataclass(frozen=True)
class Layout:
    """Names, addresses and paths of a cluster of `nodes` nodes (1: this machine, more: network namespaces)."""

    nodes: int

    @property
    def namespaced(self) -> bool:
        return self.nodes > 1

    @property
    def root(self) -> Path:
        base = os.environ.get("MOR_DS_SLURM_DIR", "/tmp/mor-ds-slurm")
        return Path(f"{base}-{self.nodes}nodes" if self.namespaced else base)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def names(self) -> list[str]:
        return [f"node{k}" for k in range(1, self.nodes + 1)] if self.namespaced else ["localhost"]

    @property
    def ports(self) -> tuple[int, int]:
        """(slurmctld, slurmd)."""
        return (16917, 16918) if self.namespaced else (16817, 16818)

    @property
    def controller_addr(self) -> str:
        return f"{subnet()}.1" if self.namespaced else "127.0.0.1"

    def addr(self, node: str) -> str:
        return f"{subnet()}.{10 + self.index(node)}" if self.namespaced else "127.0.0.1"

    def index(self, node: str) -> int:
        if node not in self.names:
            raise ValueError(f"no node {node!r} in this cluster (nodes: {', '.join(self.names)})")
        return self.names.index(node) + 1

    def netns(self, node: str) -> str:
        return f"mords-node{self.index(node)}"

    def veth(self, node: str) -> str:
        return f"mords-v{self.index(node)}"  # the bridge's end of the node's veth pair

    def pid_file(self, node: str) -> Path:
        return self.root / (f"slurmd-{node}.pid" if self.namespaced else "slurmd.pid")

    def log_file(self, node: str) -> Path:
        return self.root / (f"slurmd-{node}.log" if self.namespaced else "slurmd.log")

    def node_command(self, node: str, cmd: list[str]) -> list[str]:
        """`cmd` as run on `node`: in its network namespace, with its hostname and hosts file."""
        if not self.namespaced:
            return list(cmd)
        setup = f'mount --bind {self.root / "hosts"} /etc/hosts && hostname {node} && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.netns(node)}", "unshare", "--mount", "--uts", "--",
                "sh", "-c", setup, node, *cmd]


def slurm_conf_text(layout: Layout, cpus: int) -> str:
    root = layout.root
    ctld_port, slurmd_port = layout.ports
    if layout.namespaced:
        nodes = "\n".join(f"NodeName={n} NodeAddr={layout.addr(n)} CPUs={cpus} State=UNKNOWN" for n in layout.names)
        spool, pid, log = f"{root}/spool/%n", f"{root}/slurmd-%n.pid", f"{root}/slurmd-%n.log"
        what = f"a {layout.nodes}-node test cluster in network namespaces"
        # a node that stops answering is DOWN ~30 s later (default 300 s) and its jobs are requeued
        timeouts = "SlurmdTimeout=10\n"
    else:
        nodes = f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN"
        spool, pid, log = f"{root}/spool", f"{root}/slurmd.pid", f"{root}/slurmd.log"
        what = "a one-node test cluster"
        timeouts = ""
    return f"""\
# written by tests/integration/slurm_cluster.py: {what}
ClusterName={"mornodes" if layout.namespaced else "morcluster"}
SlurmctldHost={f"localhost({layout.controller_addr})" if layout.namespaced else "localhost"}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={spool}
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={pid}
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={log}
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
{timeouts}# requeued jobs wait cred_expire seconds before they may start again (default 120)
AuthInfo=cred_expire=5
{nodes}
PartitionName={PARTITION} Nodes={",".join(layout.names)} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    root: Path
    conf: Path
    layout: Layout = Layout(1)
    partition: str = PARTITION
    started: tuple[str, ...] = ()  # daemons this call started (empty: the cluster was already up)

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    @property
    def nodes(self) -> list[str]:
        return self.layout.names

    def scontrol(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, env={**os.environ, **self.env})
        if check and proc.returncode:
            raise RuntimeError(f"scontrol {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def node_state(self, node: str) -> str:
        return _node_state(self.env, node)

    def node_command(self, node: str, cmd: list[str]) -> list[str]:
        return self.layout.node_command(node, cmd)

    def fail_node(self, node: str) -> list[int]:
        return fail_node(self.layout, node)

    def revive_node(self, node: str, timeout: float = 60.0) -> None:
        revive_node(self.layout, node, timeout)


def _wait(predicate, what: str, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tail = ""
            if log and log.exists():
                tail = " | " + " | ".join(log.read_text(errors="replace").splitlines()[-5:])
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(0.1)


def _run(*cmd: str, check: bool = True, env: dict[str, str] | None = None,
         stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, input=stdin, env={**os.environ, **(env or {})})
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _ok(*cmd: str, env: dict[str, str] | None = None, stdin: str | None = None) -> bool:
    return _run(*cmd, check=False, env=env, stdin=stdin).returncode == 0


def _munge_works() -> bool:
    proc = subprocess.run(["munge", "-n"], capture_output=True)
    return proc.returncode == 0 and _ok("unmunge", stdin=proc.stdout.decode())


def _pid(pid_file: Path) -> int | None:
    """The pid in `pid_file` if that process is alive."""
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, IndexError, ProcessLookupError, PermissionError):
        return None
    return pid


def _node_state(env: dict[str, str], node: str) -> str:
    proc = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True,
                          env={**os.environ, **env})
    match = re.search(r"State=(\S+)", proc.stdout)
    return match.group(1) if match else ""


def _check_runnable(layout: Layout) -> None:
    needed = BINARIES + (NAMESPACE_BINARIES if layout.namespaced else ())
    missing = [b for b in needed if shutil.which(b) is None]
    if missing:
        raise ClusterUnavailable(f"Slurm/munge/iproute2 binaries not installed ({', '.join(missing)}); apt-get "
                                 "install --no-install-recommends slurmctld slurmd slurm-client munge iproute2")
    if os.geteuid() != 0:
        raise ClusterUnavailable("starting slurmctld/slurmd/munged needs root (this test cluster runs them as root)")


def _daemon(cmd: list[str], env: dict[str, str], log_dir: Path, name: str) -> None:
    """Run a self-daemonizing command. Its stderr goes to a file: a pipe would stay open (and block us)
    until the daemon closes its inherited descriptors, seconds later."""
    err = log_dir / f"{name}.stderr"
    with err.open("w") as stderr:
        code = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr).returncode
    if code:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {code}): {err.read_text().strip()}")


def _start_munge(started: list[str], log_dir: Path) -> None:
    if _munge_works():
        return
    munge = pwd.getpwnam("munge")
    MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    for path in (MUNGE_SOCKET_DIR, Path("/var/lib/munge"), Path("/var/log/munge")):
        if path.exists():
            os.chown(path, munge.pw_uid, munge.pw_gid)
    _daemon(["runuser", "-u", "munge", "--", "munged", "--force"], dict(os.environ), log_dir, "munged")
    started.append("munged")
    _wait(_munge_works, "munged to answer `munge -n`", 20)


# --------------------------------------------------------------------------------------------
# the namespace network


def _link_exists(name: str) -> bool:
    return _ok("ip", "link", "show", name)


def _netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def _check_subnet_free(layout: Layout) -> None:
    """Refuse a /24 that this machine already uses on another interface (the bridge would shadow it)."""
    prefix = f"{subnet()}."
    for line in _run("ip", "-o", "-4", "addr", "show").stdout.splitlines():
        fields = line.split()
        if fields[1] != BRIDGE and any(f.startswith(prefix) for f in fields):
            raise ClusterUnavailable(f"{subnet()}.0/24 is in use on {fields[1]}; set MOR_DS_SLURM_SUBNET to a free "
                                     f"private /24 (e.g. 10.78.0)")


def _setup_network(layout: Layout) -> None:
    """Bridge, namespaces and veth pairs (idempotent), and the hosts file the nodes resolve each other with."""
    _check_subnet_free(layout)
    if not _link_exists(BRIDGE):
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{layout.controller_addr}/24", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    for node in layout.names:
        ns, veth = layout.netns(node), layout.veth(node)
        if not _netns_exists(ns):
            _run("ip", "netns", "add", ns)
        if not _link_exists(veth):
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{layout.addr(node)}/24", "dev", "eth0")
        _run("ip", "link", "set", veth, "master", BRIDGE, "up")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
    hosts = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
    # IPv4-mapped spellings too: c10d looks its peers' names up from IPv6 sockets
    hosts += [f"{prefix}{layout.addr(n)} {n}" for prefix in ("", "::ffff:") for n in layout.names]
    (layout.root / "hosts").write_text("\n".join(hosts) + "\n")


def _namespace_pids(layout: Layout, node: str) -> list[int]:
    if not _netns_exists(layout.netns(node)):
        return []
    out = _run("ip", "netns", "pids", layout.netns(node), check=False).stdout
    return [int(p) for p in out.split()]


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _teardown_network(layout: Layout) -> None:
    for node in layout.names:
        _kill_all(_namespace_pids(layout, node))  # job steps and ranks a stopped slurmd left behind
        if _link_exists(layout.veth(node)):
            _run("ip", "link", "del", layout.veth(node), check=False)
        if _netns_exists(layout.netns(node)):
            _run("ip", "netns", "del", layout.netns(node), check=False)
    if _link_exists(BRIDGE):
        _run("ip", "link", "del", BRIDGE, check=False)


# --------------------------------------------------------------------------------------------
# start / stop


def _start_slurmd(layout: Layout, node: str, env: dict[str, str]) -> None:
    if layout.namespaced:
        (layout.root / "spool" / node).mkdir(parents=True, exist_ok=True)
    cmd = layout.node_command(node, ["slurmd", "-N", node, "-f", str(layout.conf)])
    _daemon(cmd, env, layout.root, f"slurmd-{node}")


def ensure_cluster(timeout: float = 60.0, nodes: int = 1) -> Cluster:
    """Start (or reuse) the test cluster of `nodes` nodes and set SLURM_CONF in os.environ; ClusterUnavailable if it
    cannot run here."""
    layout = Layout(nodes)
    root, conf = layout.root, layout.conf
    cluster = Cluster(root=root, conf=conf, layout=layout)
    # (scontrol retries for ~10 s when no controller answers: look at the pid file first)
    if _pid(root / "slurmctld.pid") and all(_node_state(cluster.env, n).startswith(("IDLE", "MIXED", "ALLOCATED"))
                                            for n in layout.names):
        os.environ.update(cluster.env)
        return cluster
    _check_runnable(layout)
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if layout.namespaced:
        try:
            _setup_network(layout)
        except RuntimeError as exc:  # e.g. a container without CAP_NET_ADMIN / CAP_SYS_ADMIN
            raise ClusterUnavailable(f"cannot build the namespace network: {exc}") from None
    conf.write_text(slurm_conf_text(layout, cpus=NODE_CPUS if layout.namespaced else max(2, os.cpu_count() or 2)))
    started_file = root / "started.json"
    started: list[str] = json.loads(started_file.read_text()) if started_file.exists() else []
    _start_munge(started, root)
    env = {**os.environ, **cluster.env}
    if not _pid(root / "slurmctld.pid"):
        _daemon(["slurmctld", "-c", "-f", str(conf)], env, root, "slurmctld")
        started.append("slurmctld")
    _wait(lambda: _ok("scontrol", "ping", env=cluster.env), "slurmctld to answer `scontrol ping`", timeout,
          root / "slurmctld.log")
    for node in layout.names:
        if not _pid(layout.pid_file(node)):
            _start_slurmd(layout, node, env)
            started.append(f"slurmd:{node}")
    started_file.write_text(json.dumps(sorted(set(started))))
    for node in layout.names:
        _wait(lambda node=node: _node_state(cluster.env, node).startswith("IDLE"), f"node {node} to become IDLE",
              timeout,
              layout.log_file(node))
    os.environ.update(cluster.env)
    return dataclasses.replace(cluster, started=tuple(started))


def _stop_pid(pid_file: Path, timeout: float = 30.0) -> None:
    pid = _pid(pid_file)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # exited but not reaped (its parent is init's): gone too
            return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return True

    try:
        _wait(gone, f"pid {pid} ({pid_file.name}) to exit", timeout)
    except RuntimeError:
        os.kill(pid, signal.SIGKILL)  # a slurmd with job steps may not exit on SIGTERM


def stop_cluster(nodes: int = 1) -> None:
    """Stop the daemons this helper started (slurmds, slurmctld, then munged if it started it), and for a
    namespace cluster every process left in its nodes and the network."""
    layout = Layout(nodes)
    root = layout.root
    started_file = root / "started.json"
    started = json.loads(started_file.read_text()) if started_file.exists() else []
    for node in layout.names:
        _stop_pid(layout.pid_file(node))
    _stop_pid(root / "slurmctld.pid")
    if layout.namespaced:
        _teardown_network(layout)
    if "munged" in started:
        _stop_pid(MUNGE_SOCKET_DIR / "munged.pid")
    started_file.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# a node failure and its repair


def fail_node(layout: Layout, node: str) -> list[int]:
    """The node dies as a machine does: its link goes down first (peers get no FIN/RST, only silence), then
    every process in it (slurmd, job steps, ranks) is killed. Returns the pids killed."""
    if not layout.namespaced:
        raise ValueError("a one-node cluster has no node to fail")
    _run("ip", "link", "set", layout.veth(node), "down")
    pids = _namespace_pids(layout, node)
    _kill_all(pids)
    return pids


def revive_node(layout: Layout, node: str, timeout: float = 60.0) -> None:
    """Link up, slurmd restarted; the node returns to service (ReturnToService=2) and is IDLE again."""
    _run("ip", "link", "set", layout.veth(node), "up")
    env = {"SLURM_CONF": str(layout.conf)}
    if not _pid(layout.pid_file(node)):
        _start_slurmd(layout, node, {**os.environ, **env})
    _wait(lambda: _node_state(env, node).startswith("IDLE"), f"node {node} to become IDLE", timeout,
          layout.log_file(node))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slurm_cluster.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    for action in ("start", "stop", "status", "exec", "fail", "revive"):
        p = sub.add_parser(action)
        p.add_argument("--nodes", type=int, default=1, help="1 (this machine, default) or N >= 2 namespace nodes")
        if action in ("exec", "fail", "revive"):
            p.add_argument("node", help="node1..nodeN")
        if action == "exec":
            p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv[1:])
    layout = Layout(args.nodes)
    if args.action == "start":
        try:
            cluster = ensure_cluster(nodes=args.nodes)
        except ClusterUnavailable as exc:
            print(f"slurm_cluster: {exc}", file=sys.stderr)
            return 1
        print(f"export SLURM_CONF={cluster.conf}")
    elif args.action == "stop":
        stop_cluster(args.nodes)
    elif args.action == "status":
        env = {"SLURM_CONF": str(layout.conf)}
        up = _pid(layout.root / "slurmctld.pid") is not None
        states = {n: (_node_state(env, n) if up else "") or "down" for n in layout.names}
        for node, state in states.items():
            print(f"node {node}: {state} (SLURM_CONF={layout.conf})")
        return 0 if up and all(s != "down" for s in states.values()) else 1
    elif args.action == "exec":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("exec needs a command after the node name")
        return subprocess.run(layout.node_command(args.node, cmd)).returncode
    elif args.action == "fail":
        print(f"{args.node}: link down, killed {len(fail_node(layout, args.node))} processes")
    else:
        revive_node(layout, args.node)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
