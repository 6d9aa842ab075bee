"""Two test hosts in network namespaces (tests/netns_fixture.py): a Ray head on host 1
(10.233.0.1, 2 CPUs) and a Ray worker node on host 2 (10.233.0.2, 1 CPU) on one bridge.
`distft train cluster.address=10.233.0.1:6379 cluster.placement=spread` puts one rank on
each host; gloo runs over the veth pairs.

1. Host 2 sees a different directory at the output dir's path (its own tmpfs): the run
   stops at start with one line, before any model is loaded.
2. Mid-run, host 2's switch port goes down (its link is cut; its processes keep running).
   With `cluster.max_failures: 1` Ray declares the node dead, the run fails, and distft's
   launcher starts a new worker group on host 1 (2 CPUs fit both ranks); the ranks resume
   from the newest committed checkpoint, and the run ends with the same losses and weights
   as an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import netns_fixture
from tests.cluster_run import (
    STEPS,
    assert_same_training,
    cluster_config,
    launches,
    losses,
    start_train,
)
from tests.support import DISTFT, REPO

NO_NETNS = netns_fixture.unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(NO_NETNS is not None, reason=str(NO_NETNS))]

EVERY = 4
HEAD = "10.233.0.1:6379"


def cluster_env() -> dict[str, str]:
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "GLOO_SOCKET_IFNAME": "eth0",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        # declare a silent node dead after ~3 s instead of Ray's default ~30 s
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("netns")
    env = cluster_env()
    with netns_fixture.TestNet("mn") as net:
        h1, h2 = net.add_host(), net.add_host()
        netns_fixture.ray_start(net, h1, tmp / "head.log", num_cpus=2, env=env)
        node2 = netns_fixture.ray_start(
            net, h2, tmp / "worker.log", head=h1, num_cpus=1, env=env, own_mounts=True
        )
        wait = [sys.executable, "-m", "distft.launch.raycluster", "wait-nodes", HEAD, "2"]
        joined = h1.run([*wait, "--timeout", "120"], cwd=REPO, env={**os.environ, **env})
        assert joined.returncode == 0, joined.stdout + joined.stderr
        assert "2 nodes up" in joined.stdout and "10.233.0.2" in joined.stdout
        yield net, h1, h2, node2, env, tmp


def test_output_dir_that_one_host_does_not_share_fails_at_start_with_one_line(
    two_hosts, tiny: Any
) -> None:
    """Host 2 gets its own empty tmpfs over the output dir's parent: same path, other
    directory. The workers' probe files catch it before any model is loaded."""
    net, h1, h2, node2, env, tmp = two_hosts
    hidden = tmp / "not_shared"
    netns_fixture.private_dir(node2, hidden)
    cfg = cluster_config(tiny, hidden / "run", cluster={"address": HEAD, "placement": "spread"})
    proc = h1.run([DISTFT, "train", str(cfg)], cwd=REPO, timeout=400, env={**os.environ, **env})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    ips = r"\(10\.233\.0\.([12])\)"
    m = re.fullmatch(
        rf"error: checkpoint\.output_dir: {re.escape(str(hidden / 'run'))} is not shared storage: "
        rf"workers on \S+ {ips} cannot see the file worker 0 on \S+ {ips} wrote there; "
        r"on a multi-node run every node must mount it at the same path",
        errors[0],
    )
    assert m and {m.group(1), m.group(2)} == {"1", "2"}, errors[0]
    assert "params:" not in proc.stdout  # stopped before the model was built


def test_cut_host_fails_over_and_matches_uninterrupted_run(
    two_hosts, cluster_reference: Path, tiny: Any
) -> None:
    net, h1, h2, _, env, tmp = two_hosts
    out = tmp / "run"
    cfg = cluster_config(
        tiny,
        out,
        checkpoint={"every_n_steps": EVERY, "keep_last": 2},
        cluster={"address": HEAD, "placement": "spread", "max_failures": 1},
    )
    cut_step = random.Random().randrange(EVERY + 2, STEPS - 4)
    log = tmp / "train.log"
    proc = start_train(h1, cfg, log, env)
    cut_after = None
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            done = losses(out)
            if done and max(done) >= cut_step:
                net.cut(h2)
                cut_after = max(done)
                break
            time.sleep(0.02)
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    where = f"cut host 2 after step {cut_after} (target {cut_step})"
    assert cut_after is not None, f"the run ended before step {cut_step}:\n{text[-4000:]}"
    assert proc.returncode == 0, f"{where}:\n{text[-5000:]}"
    first, second = launches(out)
    assert sorted(w["node_ip"] for w in first["workers"]) == ["10.233.0.1", "10.233.0.2"]
    assert [w["node_ip"] for w in second["workers"]] == ["10.233.0.1", "10.233.0.1"], second
    assert "restart 1 of this launch after a worker failure (2 workers on 1 node)" in text
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]
    assert len(resumed) == 1 and resumed[0] % EVERY == 0, (where, resumed)
    assert 0 < resumed[0] <= cut_after + 1, (where, resumed)
    print(f"{where}; resumed at step {resumed[0]} on host 1")
    assert_same_training(out, cluster_reference)
