"""What a checkpoint was trained with, as named hashes (compared on resume), and the file
hashing that checkpoint manifests use.

Data and tokenizer files enter the fingerprint by their contents (xxh3-128), but a start
does not read them: each file's hash is kept in `<data cache>/hashes/`, keyed by its
resolved path, size and mtime (the key the preprocessing cache uses), and computed once,
by one process per node (a file lock; the others wait and read it). A file whose size or
mtime changed is hashed again: changed contents change the fingerprint (a resume is
refused as before); the same contents with a new mtime (a copy, a `touch`) hash the same,
so the resume goes on. A hash is not kept for a file modified in the last
`RACY_SECONDS` (it could change again within the filesystem's timestamp granularity
without its mtime moving, as git's "racily clean" entries); such files are read each time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import xxhash

from distft.config import Config

_CHUNK = 1 << 22
RACY_SECONDS = 2.0


def hash_file(path: Path, sync: bool = False) -> str:
    """xxh3-128 of the file; with `sync`, also flush it to stable storage (commit)."""
    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def hash_files(paths: list[Path], cache: Path | None = None) -> str:
    """One hash over the files' names and contents; with `cache`, each file's content hash
    is looked up there by (path, size, mtime) and computed only when missing."""
    h = xxhash.xxh3_128()
    for p in sorted(paths):
        h.update(str(p.name).encode())
        h.update((hash_file(p) if cache is None else cached_hash(p, cache)).encode())
    return h.hexdigest()


def cached_hash(path: Path, cache: Path) -> str:
    """`hash_file(path)`, read from `cache` when the file's (path, size, mtime) is there."""
    from distft.data.cache import locked

    st = path.stat()
    stat_key = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns])
    entry = cache / hashlib.sha256(stat_key.encode()).hexdigest()[:32]
    if entry.is_file():
        return entry.read_text()
    if time.time_ns() - st.st_mtime_ns < RACY_SECONDS * 1e9:
        return hash_file(path)  # too fresh to trust its mtime: read it, keep nothing
    try:
        with locked(cache / f"{entry.name}.lock"):
            if entry.is_file():  # another process of this node hashed it meanwhile
                return entry.read_text()
            digest = hash_file(path)
            tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}")
            tmp.write_text(digest)
            os.replace(tmp, entry)
            return digest
    except OSError:  # a read-only cache: hash without keeping it
        return hash_file(path)


def fingerprint(cfg: Config) -> dict[str, str]:
    """Hashes of what shapes the training trajectory, by name. Logging, cluster layout,
    checkpoint cadence, the cache location and `batch.stop_after_steps` are left out on
    purpose: the batch enters as the data layer's step layout, which is equal for every
    split of the same global step into micro-batches x accumulation x workers."""
    from distft.data.cache import all_specs, cache_root
    from distft.data.loader import step_layout
    from distft.data.records import data_files

    d = cfg.redacted()
    batch = {
        "layout": step_layout(cfg, cfg.cluster.num_workers // cfg.deepspeed.sequence_parallel_size),
        "epochs": cfg.batch.epochs,
        "max_steps": cfg.batch.max_steps,
    }
    # where the cache is and how many processes fill it do not change the tokens
    data = {k: v for k, v in d["data"].items() if k not in ("cache_dir", "num_proc")}
    # where DPO's reference log-probs come from does not change them
    objective = {**d["objective"], "dpo": {**d["objective"]["dpo"], "reference": None}}
    if objective["method"] != "reward":  # added later: runs saved before it still resume
        objective.pop("reward")

    def h(obj: Any) -> str:
        return xxhash.xxh3_64_hexdigest(json.dumps(obj, sort_keys=True, default=str).encode())

    out = {
        "model": h(d["model"]),
        "lora": h(d["lora"]),
        "optim": h(d["optim"]),
        "objective": h(objective),
        "batch": h(batch),
        "deepspeed": h(d["deepspeed"]),
        "seed": h(d["seed"]),
        "data_config": h(data),
    }
    local = [
        Path(s.path) for s in all_specs(cfg.data) if s.path is not None and Path(s.path).exists()
    ]
    hashes = cache_root(cfg.data) / "hashes"
    out["data_files"] = hash_files([f for p in local for f in data_files(p)], hashes)
    if cfg.lora.enabled and (base := Path(cfg.model.name_or_path)).is_dir():
        out["base_weights"] = base_weights_key(base)
    tok_dir = Path(cfg.model.tokenizer or cfg.model.name_or_path)
    if tok_dir.is_dir():
        tok_files = [p for p in tok_dir.glob("*token*") if p.is_file()]
        out["tokenizer"] = hash_files(tok_files, hashes)
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
