from __future__ import annotations

from pathlib import Path

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
