"""Before any worker starts: is there a Ray cluster at `cluster.address`, and does it have
room for the workers? Both are bad input (exit 2), found in seconds instead of a wait
that never ends (Ray waits forever for a cluster address and for a placement group)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from distft.config import Config
from distft.errors import UserError

PROBE_TIMEOUT_S = 3.0  # one TCP connect to the address before ray.init
INIT_TIMEOUT_S = 60.0  # ray.init on an address that answers but never completes
POLL_S = 1.0  # first look at the placement group, before saying that we wait


# ---------------------------------------------------------------- cluster.address


def probe_address(address: str) -> None:
    """A TCP connect to the GCS (HOST:PORT, or the one `auto` finds) or to the `ray://`
    client server, so that an address where no Ray runs fails in seconds."""
    target = _find_auto() if address == "auto" else address.removeprefix("ray://")
    host, _, port = (target or "").rpartition(":")
    if not host or not port.isdigit():
        return  # left to ray.init (bounded by INIT_TIMEOUT_S)
    where = "" if target == address.removeprefix("ray://") else f"{target}: "
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except ConnectionRefusedError:
        raise _no_cluster(address, f"{where}connection refused") from None
    except TimeoutError:
        raise _no_cluster(address, f"{where}no answer within {PROBE_TIMEOUT_S:g} s") from None
    except socket.gaierror:
        raise _no_cluster(address, f"{where}unknown host {host}") from None
    except OSError as e:
        raise _no_cluster(address, f"{where}{e.strerror or type(e).__name__}") from None


def _find_auto() -> str | None:
    """The GCS address `ray.init("auto")` would use (RAY_ADDRESS, the cluster a `ray
    start` on this machine recorded, or the only one running here)."""
    from ray._private import services

    try:
        return services.canonicalize_bootstrap_address("auto")
    except ConnectionError as e:
        raise _init_error("auto", e) from None
    except Exception:  # a private API: if it changes, ray.init decides (bounded)
        return None


def _no_cluster(address: str, why: str) -> UserError:
    return UserError(f"cluster.address: no Ray cluster at {address} ({why})")


def connect(address: str, init: Callable[[], Any]) -> None:
    """`init` (a `ray.init` to `address`), bounded: a connection error or a connection
    that does not complete within INIT_TIMEOUT_S is one line naming the address."""
    probe_address(address)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            init()
            outcome.append(None)
        except BaseException as e:  # handed to the caller's thread
            outcome.append(e)

    thread = threading.Thread(target=attempt, name="distft-ray-init", daemon=True)
    ray_worker_log = logging.getLogger("ray._private.worker")
    ray_worker_log.addFilter(_no_sigterm_warning)  # ours are installed after ray.init
    try:
        thread.start()
        thread.join(INIT_TIMEOUT_S)
    finally:
        ray_worker_log.removeFilter(_no_sigterm_warning)
    if not outcome:
        raise _no_cluster(address, f"Ray did not connect within {INIT_TIMEOUT_S:g} s")
    if outcome[0] is not None:
        raise _init_error(address, outcome[0]) from None


def _no_sigterm_warning(record: logging.LogRecord) -> bool:
    return "SIGTERM handler is not set" not in record.getMessage()


def _init_error(address: str, err: BaseException) -> BaseException:
    if not isinstance(err, ConnectionError):
        return err
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "Could not find any running Ray instance" in first:
        return _no_cluster(address, "none runs on this machine")
    if "Found multiple active Ray instances" in first:
        return UserError(
            f"cluster.address: {address}: several Ray clusters run on this machine; "
            "give the head's HOST:PORT"
        )
    return _no_cluster(address, first)


# ---------------------------------------------------------------- room for the workers


def per_worker(cfg: Config) -> dict[str, float]:
    c = cfg.cluster
    resources = {"CPU": float(c.cpus_per_worker)}
    if c.use_gpu:
        resources["GPU"] = float(c.gpus_per_worker)
    return resources


def _amount(value: float) -> str:
    return f"{value:g}"


def _each(resources: dict[str, float]) -> str:
    return " + ".join(f"{_amount(v)} {k}" for k, v in resources.items())


def _asked(cfg: Config) -> str:
    """'4 workers × 1 CPU need 4 CPU'"""
    n, each = cfg.cluster.num_workers, per_worker(cfg)
    need = " + ".join(f"{_amount(n * v)} {k}" for k, v in each.items())
    return f"{n} worker{'s' if n != 1 else ''} × {_each(each)} need {need}"


def _has(resources: dict[str, float], keys: list[str]) -> str:
    return ", ".join(f"{_amount(resources.get(k, 0.0))} {k}" for k in keys)


def check_local_room(cfg: Config) -> None:
    """The embedded Ray is this machine and cannot grow: refuse at once."""
    import ray

    total = ray.cluster_resources()
    each = per_worker(cfg)
    n = cfg.cluster.num_workers
    if all(n * v <= total.get(k, 0.0) + 1e-9 for k, v in each.items()):
        return
    raise UserError(
        f"cluster.num_workers: {_asked(cfg)}; this machine's Ray has {_has(total, list(each))}"
    )


def wait_for_room(cfg: Config, log: Callable[[str], None]) -> None:
    """An existing cluster may autoscale, and other jobs may hold resources: reserve the
    workers' placement group ourselves and wait up to `cluster.resource_timeout_s`, then
    give up naming what was asked and what the cluster has. The reservation is released
    before Ray Train makes its own."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    c = cfg.cluster
    each = per_worker(cfg)
    pg = placement_group(
        [dict(each) for _ in range(c.num_workers)],
        strategy="PACK" if c.placement == "pack" else "SPREAD",
    )
    try:
        start = time.monotonic()
        if pg.wait(min(POLL_S, c.resource_timeout_s)):
            return
        log(
            f"waiting up to {c.resource_timeout_s:g}s for the cluster to have room: "
            f"{_asked(cfg)} ({_cluster_has(ray, list(each))})"
        )
        left = c.resource_timeout_s - (time.monotonic() - start)
        if left > 0 and pg.wait(left):
            return
        raise UserError(no_room(cfg))
    finally:
        remove_placement_group(pg)


def no_room(cfg: Config, who: str = "") -> str:
    """The give-up line: what was asked, how long we waited, what the cluster has."""
    import ray

    c = cfg.cluster
    by = f" ({who})" if who else ""
    return (
        f"cluster.num_workers: {_asked(cfg)}, and the cluster had no room for them{by} "
        f"within cluster.resource_timeout_s={c.resource_timeout_s:g}s; "
        f"{_cluster_has(ray, list(per_worker(cfg)))}"
    )


def _cluster_has(ray: Any, keys: list[str]) -> str:
    total, free = ray.cluster_resources(), ray.available_resources()
    return f"the cluster has {_has(total, keys)}, {_has(free, keys)} free"
