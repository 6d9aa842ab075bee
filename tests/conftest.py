from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from distft.assets import TinyAssets, build_tiny_assets


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    """The offline tiny Llama, tokenizer and datasets, built once per session."""
    return build_tiny_assets(Path(tmp_path_factory.mktemp("assets")) / "tiny")


@pytest.fixture(scope="session")
def cluster_reference(tiny: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run that the cluster tests compare with (tests/cluster_run.py)."""
    from tests.cluster_run import reference_run

    return reference_run(tiny, tmp_path_factory.mktemp("cluster_reference") / "run")


@pytest.fixture(scope="session")
def trained(tiny: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """ZeRO-2 full, ZeRO-3 full and ZeRO-3 LoRA runs (tests/reference_runs.py), by name."""
    from tests.reference_runs import train_all

    return train_all(tiny, Path(tmp_path_factory.mktemp("trained")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run only where CUDA is; elsewhere they skip and say why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: BENCHMARKS.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How many bad-input refusals the battery checked (tests/bad_input.py)."""
    from tests.bad_input import COUNT

    if COUNT["cases"]:
        terminalreporter.write_line(f"bad-input battery: {COUNT['cases']} refusals checked")
