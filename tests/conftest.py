from __future__ import annotations

from pathlib import Path

import pytest

from distft.assets import TinyAssets, build_tiny_assets


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    """The offline tiny Llama, tokenizer and datasets, built once per session."""
    return build_tiny_assets(Path(tmp_path_factory.mktemp("assets")) / "tiny")
