"""A diagnostic for P1: distft's own worker entry (`distft.worker.run_worker`, the same
function Ray Train runs) launched by torchrun instead of Ray, so that P1's gap splits into
what distft's loop costs and what running under Ray costs. Not a launch path: Ray's
train context is answered from torchrun's environment and nothing else is replaced.

    python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \\
        -m bench.worker_torchrun CONFIG.yaml
"""

from __future__ import annotations

import os
import sys


class _TorchrunContext:
    """What `distft.dist.init` asks of `ray.train.get_context()`."""

    def get_world_rank(self) -> int:
        return int(os.environ["RANK"])

    def get_world_size(self) -> int:
        return int(os.environ["WORLD_SIZE"])

    def get_local_rank(self) -> int:
        return int(os.environ["LOCAL_RANK"])

    def get_local_world_size(self) -> int:
        return int(os.environ["LOCAL_WORLD_SIZE"])


def main(argv: list[str]) -> None:
    import ray.train

    from distft.config import load, resolve_paths
    from distft.worker import run_worker

    ray.train.get_context = _TorchrunContext  # type: ignore[assignment]
    run_worker({"config": resolve_paths(load(argv[0], argv[1:]))})


if __name__ == "__main__":
    main(sys.argv[1:])
