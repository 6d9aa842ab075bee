"""Test hosts in Linux network namespaces, made and removed by the test.

`TestNet` is one private L2 segment: a bridge inside its own namespace (the "switch") and
one namespace per host, attached by a veth pair (`eth0` in the host, `p<i>` on the
switch), addresses 10.233.0.<i>/24. Nothing is added to the machine's own namespace, so
every daemon a test starts on a host (Ray, Slurm, munge) listens only there, and every
process of a host is found with `ip netns pids` and stopped with the network.

`cut(host)` takes the host's switch port down: the host is cut off mid-run, as if its
link or switch died. Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN); `unavailable()` says
precisely why not, for a skip reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.233.0"


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def _must(*args: str) -> None:
    proc = _ip(*args)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def unavailable() -> str | None:
    """None if network namespaces with veth pairs and a bridge can be made here, else why."""
    if os.geteuid() != 0:
        return f"network namespaces need root (CI runs as root); euid is {os.geteuid()}"
    name = f"dftprobe{os.getpid()}"
    steps = [
        ("netns add", ("netns", "add", name)),
        ("bridge", ("-n", name, "link", "add", "br0", "type", "bridge")),
        ("veth", ("-n", name, "link", "add", "va", "type", "veth", "peer", "name", "vb")),
    ]
    try:
        for what, args in steps:
            proc = _ip(*args)
            if proc.returncode != 0:
                return f"`ip {' '.join(args)}` ({what}) failed: {proc.stderr.strip()}"
        return None
    finally:
        _ip("netns", "del", name)


@dataclass
class Host:
    ns: str
    ip: str
    index: int

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """`cmd` run inside this host's network namespace (same filesystem and users)."""
        return ["nsenter", f"--net=/run/netns/{self.ns}", *cmd]

    def run(self, cmd: Sequence[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(cmd), timeout=timeout, check=False, **kw)

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.ns).stdout.split()
        return [int(p) for p in out if p.isdigit()]


@dataclass
class TestNet:
    """Hosts on one bridge. Use as a context manager; `close()` stops everything."""

    tag: str
    hosts: list[Host] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    tmp_dirs: list[Path] = field(default_factory=list)
    switch: str = ""

    def __post_init__(self) -> None:
        self.switch = f"dft{os.getpid()}{self.tag}sw"
        _must("netns", "add", self.switch)
        _must("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _must("-n", self.switch, "link", "set", "br0", "up")

    def __enter__(self) -> TestNet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_host(self) -> Host:
        index = len(self.hosts) + 1
        host = Host(ns=f"dft{os.getpid()}{self.tag}h{index}", ip=f"{SUBNET}.{index}", index=index)
        _must("netns", "add", host.ns)
        self.hosts.append(host)
        port = f"p{index}"
        _must("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
              "netns", host.ns)  # fmt: skip
        _must("-n", self.switch, "link", "set", port, "master", "br0")
        _must("-n", self.switch, "link", "set", port, "up")
        _must("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _must("-n", host.ns, "link", "set", "eth0", "up")
        _must("-n", host.ns, "link", "set", "lo", "up")
        return host

    def cut(self, host: Host) -> None:
        """The host's switch port goes down: no packet in or out, processes keep running."""
        _must("-n", self.switch, "link", "set", f"p{host.index}", "down")

    def popen(self, host: Host, cmd: Sequence[str], log: Path, env: dict[str, str] | None = None):
        """Start a long-running process on `host`; its output goes to `log`."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as f:
            proc = subprocess.Popen(
                host.argv(cmd),
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """SIGTERM what we started (5 s to shut down), then SIGKILL anything left in our
        namespaces, then delete them."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for host in self.hosts:
            for _ in range(50):
                pids = host.pids()
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.1)
            _ip("netns", "del", host.ns)
        _ip("netns", "del", self.switch)
        for proc in self.procs:
            if proc.poll() is None:
                proc.wait(timeout=10)
        for path in self.tmp_dirs:
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------- Ray


def short_tmp(net: TestNet, prefix: str) -> Path:
    """Ray's unix socket paths must stay under 107 bytes: pytest's tmp dirs are too deep.
    Removed when `net` closes."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    net.tmp_dirs.append(path)
    return path


def ray_start(
    net: TestNet,
    host: Host,
    log: Path,
    *,
    head: Host | None = None,
    num_cpus: int = 1,
    ip: str | None = None,
    env: dict[str, str] | None = None,
    own_mounts: bool = False,
) -> subprocess.Popen:
    """`ray start --block` on `host` (a head if `head` is None, else joining `head`), with
    its own --temp-dir so no `ray_current_cluster` lands in /tmp/ray. Returns when the node
    is up (or raises with the log's tail). `ip` overrides the host's address (127.0.0.1).
    `own_mounts`: the node gets a private mount namespace, for `private_dir`."""
    ray = str(Path(sys.executable).with_name("ray"))
    cmd = [
        ray, "start", "--block", "--disable-usage-stats", f"--num-cpus={num_cpus}",
        f"--node-ip-address={ip or host.ip}", f"--temp-dir={short_tmp(net, 'dray')}",
    ]  # fmt: skip
    if head is None:
        cmd += ["--head", "--port=6379", "--include-dashboard=true",
                f"--dashboard-host={ip or host.ip}", "--dashboard-port=8265"]  # fmt: skip
    else:
        cmd += [f"--address={head.ip}:6379"]
    if own_mounts:
        cmd = ["unshare", "--mount", "--propagation", "private", *cmd]
    # Ray's state API (used by Ray Train's placement-group cleaner) otherwise looks for
    # the GCS by scanning `ps`, which shows every Ray on this machine, not just this host's.
    gcs = f"{(ip or host.ip) if head is None else head.ip}:6379"
    proc = net.popen(host, cmd, log, {**(env or {}), "RAY_ADDRESS": gcs})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if "block forever" in log.read_text(errors="replace"):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"ray start on {host.ip} failed:\n{log.read_text()[-3000:]}")


def private_dir(node: subprocess.Popen, path: Path) -> None:
    """Mount an empty tmpfs over `path` for the Ray node `node` (started with
    own_mounts=True) and its workers only: that host no longer shares `path`."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["nsenter", f"--target={node.pid}", "--mount", "mount", "-t", "tmpfs", "tmpfs", str(path)],
        check=True,
    )
