from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from distft.assets import TinyAssets, build_tiny_assets

# As in an activated venv: this interpreter's bin/ first on PATH, for this process and
# every one it starts. On CPU, DeepSpeed JIT-builds its shared-memory comm op with the
# `ninja` on PATH (~40 s of one core); the venv's ninja and the system's write each other's
# build log in a format the other reads as "command changed", so every switch between
# them (workers use the venv's: distft.dist; an in-process engine would use the system's)
# rebuilt the op.
_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = os.pathsep.join([_BIN, os.environ.get("PATH", "")])

# `make test` runs the suite in 2 processes (pytest-xdist, --dist loadfile: a module's
# tests, and so its module fixtures, stay in one process). The session
# fixtures below are built once for all of them, in a directory they share, under a lock:
# the first process to need one builds it, the others wait for it and read it back.


@contextmanager
def _shared(factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """`<session tmp>/<name>`, locked while the caller builds or reads it. Under xdist
    the session tmp is the parent of this process's own (`.../popen-gw0`)."""
    base = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    with FileLock(str(base / f"{name}.lock")):
        yield base / name


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    """The offline tiny Llama, tokenizer and datasets, built once per session."""
    with _shared(tmp_path_factory, "assets") as root:
        return build_tiny_assets(root / "tiny")  # reused where its READY marker matches


@pytest.fixture(scope="session")
def cluster_reference(tiny: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run that the cluster tests compare with (tests/cluster_run.py)."""
    from tests.cluster_run import reference_run

    with _shared(tmp_path_factory, "cluster_reference") as root:
        if not (root / "DONE").is_file():
            reference_run(tiny, root / "run")
            (root / "DONE").write_text("")
        return root / "run"


@pytest.fixture(scope="session")
def trained(tiny: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """ZeRO-2 full, ZeRO-3 full and ZeRO-3 LoRA runs (tests/reference_runs.py), by name."""
    from tests.reference_runs import TrainedRun, train_all

    with _shared(tmp_path_factory, "trained") as root:
        done = root / "runs.json"
        if not done.is_file():
            runs = train_all(tiny, root)
            done.write_text(json.dumps({n: _run_record(r) for n, r in runs.items()}))
        return {
            name: TrainedRun(
                name,
                rec["cfg"],
                Path(rec["out"]),
                subprocess.CompletedProcess(rec["args"], 0, rec["stdout"], rec["stderr"]),
            )
            for name, rec in json.loads(done.read_text()).items()
        }


def _run_record(run: Any) -> dict[str, Any]:
    proc = run.proc
    args = [str(a) for a in proc.args]
    return dict(cfg=run.cfg, out=str(run.out), args=args, stdout=proc.stdout, stderr=proc.stderr)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run only where CUDA is; elsewhere they skip and say why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: BENCHMARKS.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands its bad-input count to the controller."""
    from tests.bad_input import COUNT

    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["bad_input_cases"] = COUNT["cases"]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """The controller adds up the workers' bad-input counts (xdist's hook)."""
    from tests.bad_input import COUNT

    COUNT["cases"] += getattr(node, "workeroutput", {}).get("bad_input_cases", 0)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How many bad-input refusals the battery checked (tests/bad_input.py)."""
    from tests.bad_input import COUNT

    if COUNT["cases"]:
        terminalreporter.write_line(f"bad-input battery: {COUNT['cases']} refusals checked")
