"""What a checkpoint was trained with, as named hashes (compared on resume), and the file
hashing that checkpoint manifests use."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import xxhash

from distft.config import Config

_CHUNK = 1 << 22


def hash_file(path: Path, sync: bool = False) -> str:
    """xxh3-128 of the file; with `sync`, also flush it to stable storage (commit)."""
    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def hash_files(paths: list[Path]) -> str:
    h = xxhash.xxh3_128()
    for p in sorted(paths):
        h.update(str(p.name).encode())
        h.update(hash_file(p).encode())
    return h.hexdigest()


def fingerprint(cfg: Config) -> dict[str, str]:
    """Hashes of what shapes the training trajectory, by name. Logging, cluster layout,
    checkpoint cadence, the cache location and `batch.stop_after_steps` are left out on
    purpose: the batch enters as the data layer's step layout, which is equal for every
    split of the same global step into micro-batches x accumulation x workers."""
    from distft.data.cache import all_specs
    from distft.data.loader import step_layout
    from distft.data.records import data_files

    d = cfg.redacted()
    batch = {
        "layout": step_layout(cfg, cfg.cluster.num_workers // cfg.deepspeed.sequence_parallel_size),
        "epochs": cfg.batch.epochs,
        "max_steps": cfg.batch.max_steps,
    }
    data = {k: v for k, v in d["data"].items() if k != "cache_dir"}

    def h(obj: Any) -> str:
        return xxhash.xxh3_64_hexdigest(json.dumps(obj, sort_keys=True, default=str).encode())

    out = {
        "model": h(d["model"]),
        "lora": h(d["lora"]),
        "optim": h(d["optim"]),
        "batch": h(batch),
        "deepspeed": h(d["deepspeed"]),
        "seed": h(d["seed"]),
        "data_config": h(data),
    }
    local = [
        Path(s.path) for s in all_specs(cfg.data) if s.path is not None and Path(s.path).exists()
    ]
    out["data_files"] = hash_files([f for p in local for f in data_files(p)])
    if cfg.lora.enabled and (base := Path(cfg.model.name_or_path)).is_dir():
        out["base_weights"] = base_weights_key(base)
    tok_dir = Path(cfg.model.tokenizer or cfg.model.name_or_path)
    if tok_dir.is_dir():
        out["tokenizer"] = hash_files([p for p in tok_dir.glob("*token*") if p.is_file()])
    return out


def base_weights_key(folder: Path) -> str:
    """The base model's weight files by name, size and modification time, not content: a
    LoRA checkpoint does not hold the frozen base (distft.checkpoint), so a resume must
    find the same files, and reading 16 GB at every start to prove it is not an option."""
    stats = []
    for p in sorted(folder.iterdir()):
        if p.suffix in (".safetensors", ".bin") and p.is_file():
            st = p.stat()
            stats.append((p.name, st.st_size, st.st_mtime_ns))
    return xxhash.xxh3_64_hexdigest(json.dumps(stats).encode())


def fingerprint_changes(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    """The names whose hashes differ. A name the saved fingerprint lacks was not recorded
    by the distft that saved it (a newer check), so there is nothing to compare."""
    return sorted(k for k in saved if saved[k] != current.get(k))
