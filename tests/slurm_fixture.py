"""A real Slurm cluster for tests: Debian's munged, slurmctld and slurmd, started by the
test on test hosts (tests/netns_fixture.py) and stopped with them.

`start_slurm(net, root, nodes=N)` writes a munge key and a slurm.conf under `root` (state,
spool, logs and pid files there too), starts munged and slurmctld on the first host and
one slurmd per host (`slurmd -N node<i>`), and waits until every node is idle. Each node
has `CPUs=2`, `select/cons_tres`, `proctrack/linuxproc`, `task/none`, `SlurmUser=root`,
auth/munge through the test's own socket. Client commands run on the first host with
`SLURM_CONF` pointing at the test's config (`cluster.run([...])`).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.netns_fixture import Host, TestNet

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


def missing() -> str | None:
    """None if the Slurm and munge binaries are installed, else what is missing."""
    gone = [d for d in DAEMONS if shutil.which(d) is None]
    if gone:
        return (
            f"not installed: {', '.join(gone)} (apt-get install slurmctld slurmd "
            "slurm-client munge; `make test` does this on CI)"
        )
    return None


def _conf(root: Path, hosts: Sequence[Host], cpus: int) -> str:
    nodes = "\n".join(
        f"NodeName=node{h.index} NodeAddr={h.ip} CPUs={cpus} State=UNKNOWN" for h in hosts
    )
    names = ",".join(f"node{h.index}" for h in hosts)
    return f"""\
ClusterName=distfttest
SlurmctldHost={socket.gethostname()}({hosts[0].ip})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.sock,cred_expire=30
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
{nodes}
PartitionName=test Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    net: TestNet
    hosts: list[Host]
    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), **(extra or {})}

    def run(self, cmd: Sequence[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """A client command (sbatch, scontrol, ...) on the controller's host."""
        kw.setdefault("env", self.env())
        return self.hosts[0].run(cmd, timeout=timeout, **kw)

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path) -> int:
        proc = self.run(["sbatch", "--parsable", *args], env=self.env(env), cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job is in one of `states`; returns its record."""
        deadline = time.monotonic() + timeout
        job: dict[str, str] = {}
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job.get("JobState") in states:
                return job
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f}s: {job}")

    def logs(self) -> str:
        """The tail of each daemon log, for assertion messages."""
        parts = []
        for path in sorted((self.root / "log").iterdir()):
            parts.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-1500:])
        return "\n".join(parts)


def start_slurm(net: TestNet, root: Path, nodes: int = 1, cpus: int = 2) -> SlurmCluster:
    hosts = [net.add_host() for _ in range(nodes)]
    for sub in ("munge", "state", "run", "log", *(f"spool/node{h.index}" for h in hosts)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    (root / "slurm.conf").write_text(_conf(root, hosts, cpus))
    cluster = SlurmCluster(net, hosts, root)
    m = root / "munge"
    net.popen(
        hosts[0],
        [
            "munged",
            "--foreground",
            "--force",
            f"--socket={m}/munge.sock",
            f"--key-file={key}",
            f"--pid-file={m}/munged.pid",
            f"--seed-file={m}/munged.seed",
            f"--log-file={root}/log/munged.log",
        ],  # fmt: skip
        root / "log" / "munged.out",
    )
    _wait_for(lambda: (m / "munge.sock").exists(), 30, "munged socket", cluster)
    net.popen(hosts[0], ["slurmctld", "-D", "-i"], root / "log" / "slurmctld.out", cluster.env())
    for h in hosts:
        name = f"node{h.index}"
        net.popen(h, ["slurmd", "-D", "-N", name], root / "log" / f"{name}.out", cluster.env())

    def all_idle() -> bool:
        out = cluster.run(["sinfo", "-h", "-N", "-o", "%N %t"]).stdout.split("\n")
        states = [line.split()[1] for line in out if line.strip()]
        return len(states) == nodes and all(s == "idle" for s in states)

    _wait_for(all_idle, 60, "all Slurm nodes idle", cluster)
    return cluster


def _wait_for(cond, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise RuntimeError(f"timed out waiting for {what}\n{cluster.logs()}")
