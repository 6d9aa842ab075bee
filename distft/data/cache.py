"""The preprocessing cache: one entry per (source, tokenization settings).

An entry is `<cache_dir>/<key>/` holding the source's tokenized samples (`store.TokenArrays`)
and `meta.json` (counts of records, skipped, truncated and dropped samples). A source of
preference pairs stores each pair as two rows, chosen then rejected (rows 2k and 2k+1 are
pair k); its meta's `pairs` is the number of pairs (`samples`, the rows, is twice that),
and 0 for any other source. The key is a
hash of everything that changes the tokens: each data file's path, size and mtime (a hub
dataset's name, subset, split and revision), the format and field names, `max_samples`,
the tokenizer (its serialized vocabulary/merges/normalizer, special tokens and chat
template), the template used, `max_seq_len`, `too_long`, `train_on` and `on_bad_record`.
Packing and batching are not part of it: they are recomputed from the lengths at load;
nor is `num_proc`, the processes that tokenize (`parallel`: the same bytes on any number).

Building is safe to race: a builder takes an exclusive file lock on the entry, writes into
a temporary directory and renames it into place, so readers only ever see whole entries.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distft.config import DataConfig, SourceConfig
from distft.data.formats import ReadReport, parse
from distft.data.parallel import ChunkEncoder
from distft.data.records import DataError, Raw, data_files, file_records, hub_records
from distft.data.store import TokenArrays, TokenWriter
from distft.data.tokenize import EncodeSettings, TokenizeReport

# 2: sentinel-located assistant turns (data/templates.py); 3: `auto` reads a record with
# `chosen`/`rejected` as a preference pair (it was another format's record before)
CACHE_VERSION = 3
PROGRESS_SECONDS = 10.0


@dataclass(frozen=True)
class SourceSpec:
    """One source with the data-level defaults applied."""

    label: str  # how messages name it: the path, or the hub name
    path: str | None = None
    hub: str | None = None
    subset: str | None = None
    split: str = "train"
    revision: str | None = None
    format: str = "auto"
    fields: dict[str, str] = field(default_factory=dict)
    weight: float = 1.0
    max_samples: int | None = None

    def raws(self) -> Iterator[Raw]:
        if self.hub is not None:
            yield from hub_records(self.hub, self.subset, self.split, self.revision)
            return
        assert self.path is not None
        for f in data_files(Path(self.path)):
            yield from file_records(f)

    def identity(self) -> dict[str, Any]:
        """What the records depend on (cheap: file stats, not contents)."""
        if self.hub is not None:
            return {"hub": self.hub, "subset": self.subset, "split": self.split,
                    "revision": self.revision}  # fmt: skip
        assert self.path is not None
        files = data_files(Path(self.path))
        return {"files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]}

    def records_key(self, on_bad_record: str) -> str:
        return _hash(
            [CACHE_VERSION, self.identity(), self.format, self.fields, self.max_samples,
             on_bad_record]
        )  # fmt: skip


def source_specs(data: DataConfig, which: str) -> list[SourceSpec]:
    """The train (`which="train"`) or eval sources, in config order, defaults applied."""
    files = data.train_files if which == "train" else data.eval_files
    sources = data.sources if which == "train" else data.eval_sources
    listed = [SourceConfig.model_validate({"path": f}) for f in files]
    return [_spec(s, data) for s in [*listed, *sources]]


def eval_set_specs(data: DataConfig) -> dict[str, list[SourceSpec]]:
    """The named eval sets' sources (`data.eval_sets`), by set name, in config order."""
    return {
        name: [_spec(SourceConfig.model_validate({"path": f}), data) for f in es.files]
        + [_spec(s, data) for s in es.sources]
        for name, es in data.eval_sets.items()
    }


def all_specs(data: DataConfig) -> list[SourceSpec]:
    """Every source: train, the unnamed eval set, then the named eval sets."""
    named = [spec for specs in eval_set_specs(data).values() for spec in specs]
    return source_specs(data, "train") + source_specs(data, "eval") + named


def _spec(s: SourceConfig, data: DataConfig) -> SourceSpec:
    return SourceSpec(
        label=s.hub or s.path or "",
        path=s.path,
        hub=s.hub,
        subset=s.subset,
        split=s.split,
        revision=s.revision,
        format=s.format or data.format,
        fields=dict(s.fields if s.fields is not None else data.fields),
        weight=s.weight,
        max_samples=s.max_samples or data.max_samples,
    )


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "distft" / "data"


def cache_root(data: DataConfig) -> Path:
    return Path(data.cache_dir) if data.cache_dir else default_cache_dir()


def _hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = [type(tokenizer).__name__, len(tokenizer), tokenizer.chat_template,
             tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]  # fmt: skip
    h.update(json.dumps(extra, default=str).encode())
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class CacheContext:
    """Everything besides the source that the tokens depend on, and where they go; and
    the processes that tokenize (not in the key: the output is the same)."""

    tokenizer: Any
    settings: EncodeSettings
    on_bad: str
    root: Path
    tok_fp: str
    num_proc: int = 1

    @classmethod
    def create(
        cls, tokenizer: Any, settings: EncodeSettings, on_bad: str, root: Path, num_proc: int = 1
    ) -> CacheContext:
        fp = tokenizer_fingerprint(tokenizer)
        return cls(tokenizer, settings, on_bad, root, fp, num_proc)

    def key(self, spec: SourceSpec) -> str:
        return _hash([spec.records_key(self.on_bad), self.tok_fp, asdict(self.settings)])


@contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class BuildResult:
    path: Path
    meta: dict[str, Any]
    built: bool  # False: reused


def build_entry(
    spec: SourceSpec, ctx: CacheContext, log: Callable[[str], None] = lambda _: None
) -> BuildResult:
    """Tokenize `spec` into the cache unless an entry for it exists already; a progress
    line goes to `log` every `PROGRESS_SECONDS` while it runs."""
    root, on_bad, key = ctx.root, ctx.on_bad, ctx.key(spec)
    final = root / key
    with locked(root / f"{key}.lock"):
        if final.is_dir():
            return BuildResult(final, _meta(final), built=False)
        tmp = root / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            meta = _write(spec, ctx, tmp, log)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.rename(tmp, final)
        except OSError:  # another node on shared storage won (no working flock there)
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.is_dir():
                raise
        mark_checked(root, spec, on_bad)
        return BuildResult(final, meta, built=True)


def _write(
    spec: SourceSpec, ctx: CacheContext, directory: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """Tokenize `spec` into a new store in `directory`, sample by sample (on `ctx.num_proc`
    processes once it has taken `parallel.POOL_AFTER_SECONDS`); its meta."""
    t0 = shown = time.perf_counter()
    read, tok = ReadReport(), TokenizeReport()
    samples = parse(spec.raws(), spec.format, spec.fields, ctx.on_bad, read, spec.max_samples)
    encoder = ChunkEncoder(ctx.tokenizer, ctx.settings, ctx.on_bad, ctx.num_proc)
    rows = encoder.rows(samples, tok)
    writer = TokenWriter(directory)
    try:
        for ids, labels in rows:
            writer.add(ids, labels)
            if time.perf_counter() - shown > PROGRESS_SECONDS:
                shown = time.perf_counter()
                log(f"preprocessed {spec.label}: {len(writer):,} samples, {writer.tokens:,} "
                    f"tokens so far ({read.records:,} records, {shown - t0:.0f}s, "
                    f"{_processes(encoder.processes)})")  # fmt: skip
    finally:
        rows.close()  # a pool is shut down, whatever happened
        writer.close()
    if len(writer) == 0:
        raise DataError(
            f"{spec.label}: no usable samples ({read.records} records read, "
            f"{read.skipped + tok.skipped} skipped, {tok.dropped} over max_seq_len dropped)"
        )
    meta = {
        "source": spec.label,
        "records": read.records + read.skipped,
        "samples": len(writer),
        "pairs": tok.pairs,
        "tokens": writer.tokens,
        "targets": sum(writer.targets),
        "skipped": read.skipped + tok.skipped,
        "truncated": tok.truncated,
        "dropped": tok.dropped,
        "first_skipped": (read.first_skipped + tok.first_skipped)[:3],
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    writer.finish(meta)
    return meta


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def load_entry(spec: SourceSpec, ctx: CacheContext) -> tuple[TokenArrays, dict[str, Any]]:
    root = ctx.root
    path = root / ctx.key(spec)
    if not path.is_dir():
        raise DataError(
            f"{spec.label}: no preprocessed data in {root} (the files changed while the "
            "run started, or the cache is not shared between this node's workers)"
        )
    return TokenArrays.load(path)


def _meta(path: Path) -> dict[str, Any]:
    return json.loads((path / "meta.json").read_text())


def mark_checked(root: Path, spec: SourceSpec, on_bad: str) -> None:
    marker = root / "checked" / spec.records_key(on_bad)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def is_checked(root: Path, spec: SourceSpec, on_bad: str) -> bool:
    """True when these exact records were already parsed without a fatal error."""
    return (root / "checked" / spec.records_key(on_bad)).is_file()
