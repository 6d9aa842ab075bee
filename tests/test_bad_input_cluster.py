"""Issue 16, the cluster: bad input that only Ray can reveal is still one line and exit 2,
found in seconds instead of a wait that never ends.

- `cluster.address` where no Ray runs (GCS `host:port`, `ray://host:port`, `auto`).
- More workers than the cluster can host: refused at once on the embedded Ray (it cannot
  grow); on an existing cluster (a real `ray start --head` in a network namespace, see
  tests/netns_fixture.py) distft waits `cluster.resource_timeout_s`, saying so, then
  names what was asked and what the cluster has.

A user error raised inside a worker printing no Ray traceback is checked on a real
corrupted checkpoint in tests/test_checkpoint_e2e.py (the explicit-resume refusal).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distft.errors import UserError
from distft.launch import resources
from distft.launch.ray import is_user_error
from tests import netns_fixture
from tests.bad_input import refuse
from tests.support import DISTFT, REPO, tiny_config, write_config

NO_NETNS = netns_fixture.unavailable()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(tiny: Any, tmp: Path, **cluster: Any) -> Path:
    cfg = tiny_config(tiny, tmp / "run", cluster=cluster, logging={"wandb": {"mode": "disabled"}})
    cfg["data"]["eval_files"] = []
    return write_config(tmp / "c.yaml", cfg)


# ------------------------------------------------------------ no cluster at the address


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_no_ray_at_the_address_fails_in_seconds(scheme: str) -> None:
    address = f"{scheme}127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(UserError) as caught:
        resources.connect(address, lambda: pytest.fail("ray.init was reached"))
    assert time.monotonic() - start < 10
    assert str(caught.value) == f"cluster.address: no Ray cluster at {address} (connection refused)"


def test_auto_with_no_ray_running_fails_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    port = closed_port()  # `auto` follows RAY_ADDRESS, as `ray.init` does
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(UserError) as caught:
        resources.connect("auto", lambda: pytest.fail("ray.init was reached"))
    assert time.monotonic() - start < 10
    # Ray names loopback by the machine's address
    pattern = rf"cluster\.address: no Ray cluster at auto \(\S+:{port}: connection refused\)"
    assert re.fullmatch(pattern, str(caught.value)), str(caught.value)


def test_auto_with_no_ray_on_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in RAY_ADDRESS, no `ray start` recorded, no Ray process found."""
    from ray._private import services

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    with pytest.raises(UserError) as caught:
        resources.connect("auto", lambda: pytest.fail("ray.init was reached"))
    expected = "cluster.address: no Ray cluster at auto (none runs on this machine)"
    assert str(caught.value) == expected


def test_a_hung_ray_init_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """An address that accepts the connection but never completes a Ray handshake."""
    monkeypatch.setattr(resources, "INIT_TIMEOUT_S", 0.5)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(UserError) as caught:
            resources.connect(address, lambda: time.sleep(30))
    assert str(caught.value) == (
        f"cluster.address: no Ray cluster at {address} (Ray did not connect within 0.5 s)"
    )


@pytest.mark.slow
def test_cli_no_ray_at_the_address(tiny: Any, tmp_path: Path) -> None:
    address = f"127.0.0.1:{closed_port()}"
    refuse(
        "train",
        str(config(tiny, tmp_path, address=address)),
        expect=f"error: cluster.address: no Ray cluster at {address} (connection refused)",
        subprocess=True,
    )


# ------------------------------------------------------------ room for the workers


@pytest.mark.slow
def test_embedded_ray_refuses_more_than_the_machine_has(tiny: Any, tmp_path: Path) -> None:
    outcome = refuse(
        "train",
        str(config(tiny, tmp_path, num_workers=2, cpus_per_worker=4096)),
        expect="error: cluster.num_workers: 2 workers × 4096 CPU need 8192 CPU; "
        "this machine's Ray has ",
        subprocess=True,
    )
    assert re.search(r"this machine's Ray has \d+ CPU$", outcome.errors[0]), outcome.errors
    assert not (tmp_path / "run" / "launches.jsonl").exists()  # no worker group started


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, str]]]:
    """A 2-CPU `ray start --head` on 127.0.0.1 of a private network namespace."""
    if NO_NETNS is not None:
        pytest.skip(NO_NETNS)
    tmp = tmp_path_factory.mktemp("head")
    env = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    with netns_fixture.TestNet("bic") as net:
        host = net.add_host()
        netns_fixture.ray_start(net, host, tmp / "head.log", num_cpus=2, ip="127.0.0.1", env=env)
        yield host, env


@pytest.mark.slow
def test_existing_cluster_waits_resource_timeout_then_names_both(
    ray_head: tuple[Any, dict[str, str]], tiny: Any, tmp_path: Path
) -> None:
    host, env = ray_head
    cfg = config(tiny, tmp_path, address="auto", num_workers=3, resource_timeout_s=5)
    start = time.monotonic()
    proc = host.run(
        [DISTFT, "train", str(cfg)],
        cwd=REPO,
        timeout=300,
        env={**os.environ, **env, "RAY_ADDRESS": "127.0.0.1:6379"},
    )
    took = time.monotonic() - start
    shown = f"exit {proc.returncode} in {took:.0f}s\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, shown
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    asked = "3 workers × 1 CPU need 3 CPU"
    assert f"warning: waiting up to 5s for the cluster to have room: {asked} (" in proc.stderr
    assert errors[0] == (
        f"error: cluster.num_workers: {asked}, and the cluster had no room for them within "
        "cluster.resource_timeout_s=5s; the cluster has 2 CPU, 2 CPU free"
    ), shown
    assert not (tmp_path / "run" / "launches.jsonl").exists()


# ------------------------------------------------------------ user errors in workers


def test_user_errors_are_told_from_crashes() -> None:
    """What the worker-process hook (distft.launch.ray.quiet_user_errors) silences."""

    class Failed(Exception):
        def __init__(self, failures: dict[int, BaseException]):
            self.worker_failures = failures

    class Wrapped(Exception):  # Ray Train's UserExceptionWithTraceback keeps `cause`
        def __init__(self, cause: BaseException):
            self.cause = cause

    assert is_user_error(UserError("bad"))
    assert is_user_error(Failed({0: Wrapped(UserError("a")), 1: UserError("b")}))
    assert not is_user_error(Failed({0: Wrapped(UserError("a")), 1: Wrapped(KeyError("b"))}))
    assert not is_user_error(RuntimeError("crash"))
    assert not is_user_error(None)
