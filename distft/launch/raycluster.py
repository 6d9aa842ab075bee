"""A Ray cluster that distft did not start (Slurm allocation, test hosts): wait until the
expected number of nodes has joined, before any worker is placed.

    python -m distft.launch.raycluster wait-nodes HOST:PORT N [--timeout SECONDS]

prints one line and exits 0 when N nodes are alive, or prints one `error:` line and
exits 1 at the timeout (naming the nodes that did join). `launch/slurm/distft.sbatch`
calls it between starting the Ray nodes and `distft train`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def alive_nodes() -> list[str]:
    import ray

    return sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])


def wait_for_nodes(address: str, count: int, timeout: float) -> list[str]:
    """Connect to `address`, poll until `count` nodes are alive; returns their addresses.
    Raises TimeoutError naming the nodes that joined."""
    import ray

    t0 = time.monotonic()
    ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    try:
        while True:
            nodes = alive_nodes()
            if len(nodes) >= count:
                return nodes
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(
                    f"ray cluster at {address}: {len(nodes)} of {count} nodes joined within "
                    f"{timeout:.0f}s ({', '.join(nodes) or 'none'})"
                )
            time.sleep(1.0)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distft.launch.raycluster")
    sub = parser.add_subparsers(dest="cmd", required=True)
    wait = sub.add_parser("wait-nodes", help="wait until N nodes are alive")
    wait.add_argument("address", help="GCS address HOST:PORT")
    wait.add_argument("count", type=int)
    wait.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    try:
        nodes = wait_for_nodes(args.address, args.count, args.timeout)
    except (TimeoutError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"ray cluster at {args.address}: {len(nodes)} nodes up after "
        f"{time.monotonic() - t0:.0f}s ({', '.join(nodes)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
