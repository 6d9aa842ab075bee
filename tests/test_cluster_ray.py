"""An existing Ray cluster: `launch/ray/submit.sh` submits a run with `ray job submit` to a
Ray head on loopback, with this checkout as the job's working_dir, and the job trains to
completion (2 workers, ZeRO-2), with the same result as an uninterrupted local run.

The head runs in a network namespace the test creates (tests/netns_fixture.py), so what it
listens on is private to the test, and the test stops exactly its processes.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import netns_fixture
from tests.cluster_run import assert_same_training, cluster_config, launches
from tests.support import REPO

NO_NETNS = netns_fixture.unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(NO_NETNS is not None, reason=str(NO_NETNS))]


def cluster_env() -> dict[str, str]:
    """Token auth with a fresh token; gloo on loopback; the venv's tools first on PATH."""
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "GLOO_SOCKET_IFNAME": "lo",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }


@pytest.fixture(scope="module")
def submitted(tiny: Any, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ray_submit")
    env = cluster_env()
    with netns_fixture.TestNet("job") as net:
        host = net.add_host()
        netns_fixture.ray_start(net, host, tmp / "head.log", num_cpus=2, ip="127.0.0.1", env=env)
        out = tmp / "run"
        path = cluster_config(tiny, out)
        proc = host.run(
            [
                "bash",
                str(REPO / "launch/ray/submit.sh"),
                "--address",
                "http://127.0.0.1:8265",
                str(path),
            ],  # fmt: skip
            cwd=tmp,
            timeout=600,
            env={**os.environ, **env},
        )
        yield proc, out, tmp


def test_ray_job_submit_trains_to_completion(submitted, cluster_reference: Path) -> None:
    proc, out, tmp = submitted
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:] + (tmp / "head.log").read_text()[-2000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", log), log[-3000:]
    assert "Uploading package gcs://_ray_pkg_" in log, log[:3000]  # the working_dir
    assert "workers up: 2 workers on 1 node; all see the output dir" in log
    assert_same_training(out, cluster_reference)


def test_workers_ran_on_the_submitted_cluster(submitted) -> None:
    _, out, _ = submitted
    (start,) = launches(out)
    assert [w["rank"] for w in start["workers"]] == [0, 1]
    assert {w["node_ip"] for w in start["workers"]} == {"127.0.0.1"}
    assert start["restart"] == 0
