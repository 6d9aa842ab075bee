"""Security: no W&B API key on disk, no arbitrary unpickling while resharding, no reuse of
a tampered universal checkpoint. One real 1-worker run (W&B offline, a planted key) feeds
all of them; its checkpoint is the conversion's input."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from distft import safeload
from distft.checkpoint import CheckpointError, reshard
from distft.dist import DistContext
from tests.support import DISTFT, REPO, tiny_config, write_config

ENV_KEY = "3f9a1c27be5d4e80a6c2d9f1e7b34a05c8d2e6f9"  # fake, 40 hex chars like a real one
CONFIG_KEY = "b7e2d0a94c1f8e35d6a0b2c9f4e71d83a5c06b2e"
ONE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@dataclass(frozen=True)
class KeyedRun:
    out: Path  # the run directory (checkpoint.output_dir)
    ray_dir: Path  # the embedded Ray's temp dir (sessions, logs)
    proc: subprocess.CompletedProcess

    def checkpoint(self) -> Path:
        ckpts = self.out / "checkpoints"
        return ckpts / (ckpts / "latest").read_text().strip()


@pytest.fixture(scope="module")
def keyed_run(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedRun]:
    """2 steps, W&B offline, the key in the env and in the config; Ray's temp dir is
    private to the run (short: Ray's socket paths have a length limit)."""
    root = tmp_path_factory.mktemp("keyed")
    out = root / "run"
    cfg = tiny_config(
        tiny,
        out,
        batch={"max_steps": 2, "grad_accum": 1},
        cluster={"num_workers": 1},
        checkpoint={"output_dir": str(out), "save_final_model": False},
        logging={"every_n_steps": 1, "wandb": {"mode": "offline", "api_key": CONFIG_KEY}},
    )
    ray_tmp = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))
    env = {**os.environ, "WANDB_API_KEY": ENV_KEY, "RAY_TMPDIR": str(ray_tmp)}
    proc = subprocess.run(
        [DISTFT, "train", str(write_config(root / "config.yaml", cfg))],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    try:
        yield KeyedRun(out, ray_tmp, proc)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def files_holding(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                data = p.read_bytes()
            except OSError:
                continue
            hits += [f"{p}: {n.decode()[:6]}..." for n in needles if n in data]
    return hits


def test_wandb_api_key_is_written_nowhere(keyed_run: KeyedRun) -> None:
    needles = [ENV_KEY.encode(), CONFIG_KEY.encode()]
    assert list((keyed_run.out / "wandb").glob("offline-run-*/run-*.wandb"))  # W&B ran
    sessions = list((keyed_run.ray_dir / "ray").glob("session_*"))
    assert sessions, list(keyed_run.ray_dir.rglob("*"))[:10]  # the run's Ray wrote here
    assert any(sessions[0].glob("logs/*")), "no Ray logs to search"
    hits = files_holding(keyed_run.out, needles) + files_holding(keyed_run.ray_dir, needles)
    home = Path.home()  # where `wandb login` would keep a key
    for place in (home / ".config" / "wandb", home / ".cache" / "wandb"):
        hits += files_holding(place, needles) if place.is_dir() else []
    netrc = home / ".netrc"
    assert not netrc.is_file() or all(n not in netrc.read_bytes() for n in needles)
    assert not hits, hits
    for text in (keyed_run.proc.stdout, keyed_run.proc.stderr):
        assert ENV_KEY not in text and CONFIG_KEY not in text


# ------------------------------------------------------------------ universal conversion


class Planted:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def copy_checkpoint(run: KeyedRun, dest: Path) -> Path:
    ckpt = dest / "checkpoints" / run.checkpoint().name
    shutil.copytree(run.checkpoint(), ckpt)
    return ckpt


def test_conversion_refuses_a_planted_pickle(keyed_run: KeyedRun, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(keyed_run, tmp_path)
    marker = tmp_path / "marker"
    (model_file,) = ckpt.glob("*model_states.pt")
    state = torch.load(model_file, weights_only=False)  # our own file, just written
    state["planted"] = Planted(marker)
    torch.save(state, model_file)
    torch_load = torch.load
    with pytest.raises(CheckpointError) as refused:
        reshard.to_universal(ckpt, ONE)
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and "refused to unpickle" in message, message
    assert str(model_file) in message
    assert not marker.exists()
    assert torch.load is torch_load  # the weights-only patch is undone
    assert not list((ckpt.parent / ".universal").glob("*"))  # nothing half-converted left


def test_tampered_universal_is_converted_again(keyed_run: KeyedRun, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(keyed_run, tmp_path)
    universal = reshard.to_universal(ckpt, ONE)
    assert reshard.check_universal(universal, ckpt) is None
    fp32 = next(universal.rglob("fp32.pt"))
    original = fp32.read_bytes()
    fp32.write_bytes(original[:-8] + b"tampered")
    assert reshard.check_universal(universal, ckpt) == f"{universal}: " + (
        f"{fp32.relative_to(universal)} does not match its hash"
    )
    assert reshard.to_universal(ckpt, ONE) == universal  # converted again
    assert fp32.read_bytes() == original
    assert reshard.check_universal(universal, ckpt) is None

    # a half-written one (no manifest) and a planted extra file are not reused either
    (universal / reshard.MANIFEST).unlink()
    assert "no valid universal_manifest.json" in str(reshard.check_universal(universal, ckpt))
    reshard.to_universal(ckpt, ONE)
    (universal / "zero" / "extra.pt").write_bytes(b"x")
    assert "files differ from its manifest" in str(reshard.check_universal(universal, ckpt))


def test_weights_only_loads_survive_a_nested_allow_list(tmp_path: Path) -> None:
    """torch's `safe_globals` removes its classes on exit: the weights-only checkpoint
    engine (its own allow-list) inside `weights_only_loads` must not empty the outer one
    (DeepSpeed loads model states through the engine, then optimizer_state.pt directly)."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from distft.safeload import checkpoint_engine as weights_only_checkpoint_engine

    path = tmp_path / "state.pt"
    torch.save({"stage": ZeroStageEnum.gradients, "t": torch.ones(2)}, path)
    with safeload.forced():
        assert weights_only_checkpoint_engine().load(str(path))["stage"] == 2
        assert torch.load(path, weights_only=False)["stage"] == 2  # forced weights-only
