"""The shipped `launch/slurm/distft.sbatch` under a real Slurm (munged + slurmctld + one
slurmd per test host, tests/slurm_fixture.py) on two test hosts in network namespaces.

1. `sbatch --nodes=2`: Ray head on node1, Ray worker on node2 joined over the test
   network, one distft worker per node (gloo across the veth), trains to completion.
2. `sbatch --nodes=1`, then `scancel --batch --signal=TERM` mid-run (what
   `--signal=B:TERM@grace` does before the time limit): the job commits a checkpoint,
   requeues itself, and the requeued job resumes; its per-step losses and final weights
   equal run 1's bit for bit.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import netns_fixture, slurm_fixture
from tests.cluster_run import STEPS, assert_same_training, cluster_config, launches, losses
from tests.support import REPO

NO_SLURM = netns_fixture.unavailable() or slurm_fixture.missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(NO_SLURM is not None, reason=str(NO_SLURM))]

SBATCH = REPO / "launch" / "slurm" / "distft.sbatch"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def job_env() -> dict[str, str]:
    """What `sbatch` exports to the job: the venv's distft/python/ray first on PATH, and
    gloo on the test hosts' interface."""
    return {
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "GLOO_SOCKET_IFNAME": "eth0",
    }


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("slurm")
    with netns_fixture.TestNet("slurm") as net:
        yield slurm_fixture.start_slurm(net, root / "cluster", nodes=2, cpus=2)


def output(job_log: Path) -> str:
    return job_log.read_text(errors="replace") if job_log.is_file() else "(no job output)"


@pytest.fixture(scope="module")
def two_node_run(slurm, tiny: Any, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("two_node")
    out = tmp / "run"
    log = tmp / "job.out"
    job_id = slurm.sbatch(
        "--nodes=2", f"--output={log}", str(SBATCH),
        str(cluster_config(tiny, out, cluster={"placement": "spread"})), env=job_env(), cwd=tmp,
    )  # fmt: skip
    job = slurm.wait(job_id, ENDED, timeout=900)
    return job, out, log


def test_sbatch_on_two_nodes_trains_to_completion(two_node_run, slurm, cluster_reference) -> None:
    job, out, log = two_node_run
    text = output(log)
    assert job["JobState"] == "COMPLETED", f"{job}\n{text[-5000:]}\n{slurm.logs()}"
    assert "2 nodes (node1 node2), head node1 at 10.233.0.1:6379" in text
    assert "ray cluster at 10.233.0.1:6379: 2 nodes up" in text
    assert "workers up: 2 workers on 2 nodes" in text  # one per node
    (start,) = launches(out)
    assert sorted(w["node_ip"] for w in start["workers"]) == ["10.233.0.1", "10.233.0.2"]
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    assert_same_training(out, cluster_reference)  # gloo across the veth: same bits


def wait_until_steps_gone(job_id: int, timeout: float) -> None:
    """Until no `slurmstepd: [<job_id>.*]` process is left (read-only: /proc)."""
    deadline = time.monotonic() + timeout
    prefix = f"slurmstepd: [{job_id}.".encode()
    while time.monotonic() < deadline:
        left = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(prefix):
                    left.append(proc.name)
            except OSError:
                continue
        if not left:
            return
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id}: slurmstepd still running after {timeout:.0f}s")


def test_sigterm_commits_requeues_and_resumes_exactly(
    slurm, cluster_reference: Path, tiny: Any, tmp_path: Path
) -> None:
    """No periodic checkpoints: the requeued job can only resume from the preemption's."""
    out = tmp_path / "run"
    log = tmp_path / "job.out"
    job_id = slurm.sbatch(
        "--nodes=1", f"--output={log}", str(SBATCH),
        str(cluster_config(tiny, out)), env=job_env(), cwd=tmp_path,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        done = losses(out) if (out / "metrics.jsonl").is_file() else {}
        if done and max(done) >= 3:
            break
        assert slurm.job(job_id).get("JobState") not in ENDED, output(log)[-5000:]
        time.sleep(0.05)
    signalled = slurm.run(["scancel", "--batch", "--signal=TERM", str(job_id)])
    assert signalled.returncode == 0, signalled.stderr
    # Slurm holds a requeued job (Reason=BeginTime) for AuthInfo cred_expire (30 s in
    # tests/slurm_fixture.py, 120 s by default) and the test waits it out:
    # releasing it early (`scontrol update StartTime=now`) raced with slurmd's cleanup of
    # the first run ("Job N already killed, do not launch batch job") and failed the job.
    held = slurm.wait(job_id, {"PENDING", *ENDED}, timeout=300)
    if held["JobState"] == "PENDING":
        assert held["Restarts"] == "1", held
        wait_until_steps_gone(job_id, timeout=120)
    job = slurm.wait(job_id, ENDED, timeout=900)
    text = output(log)
    assert job["JobState"] == "COMPLETED", f"{job}\n{text[-6000:]}\n{slurm.logs()}"
    assert job["Restarts"] == "1", job
    assert "SIGTERM: asking distft to commit a checkpoint and stop" in text
    stopped = re.findall(r"stopped at step (\d+) \(preemption\); checkpoint committed", text)
    resumed = re.findall(r"resumed from \S+ at step (\d+)", text)
    assert len(stopped) == 1 and resumed == stopped, text[-6000:]
    assert 3 <= int(stopped[0]) < STEPS
    assert f"preempted (exit 75): requeueing job {job_id}" in text
    assert f"job {job_id} (restart 1)" in text
    assert_same_training(out, cluster_reference)  # every step, before and after the requeue


def test_bad_config_fails_before_ray_starts_and_is_not_requeued(
    slurm, tiny: Any, tmp_path: Path
) -> None:
    log = tmp_path / "job.out"
    job_id = slurm.sbatch(
        f"--output={log}", str(SBATCH), str(cluster_config(tiny, tmp_path / "run")),
        "optim.lrr=1", env=job_env(), cwd=tmp_path,
    )  # fmt: skip
    job = slurm.wait(job_id, ENDED, timeout=300)
    text = output(log)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0", f"{job}\n{text}"
    assert job["Restarts"] == "0"
    assert "error: optim.lrr: unknown key" in text
    assert "Ray runtime started" not in text and "requeue" not in text
