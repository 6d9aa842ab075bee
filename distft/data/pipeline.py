"""Config -> cached tokenized sources -> the train and eval splits.

`prepare` is what a worker calls: the first process of each node (local rank 0) builds
the missing cache entries under a file lock, everybody waits at a barrier, then every
rank memory-maps the entries. A builder that fails raises its own `DataError`; the ranks
waiting at the barrier are then stopped by the launcher, so the run reports that error.

Mixing: a train source of n usable samples with weight w contributes round(w x n) samples
per epoch: every sample floor(w) times, plus a seeded subset for the fraction. With
`val_fraction`, a seeded subset of each train source is held out as eval data first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distft.config import Config
from distft.data.cache import (
    BuildResult,
    CacheContext,
    SourceSpec,
    all_specs,
    build_entry,
    cache_root,
    eval_set_specs,
    is_checked,
    load_entry,
    source_specs,
)
from distft.data.formats import ReadReport, Sample, parse
from distft.data.pairs import PairSplit, pair_rows
from distft.data.parallel import resolve_num_proc
from distft.data.records import DataError, data_files, file_records
from distft.data.store import Split, TokenArrays
from distft.data.templates import chat_template
from distft.data.tokenize import Encoder, EncodeSettings, TokenizeReport
from distft.dist import DistContext


@dataclass
class DataSplits:
    train: Split | PairSplit  # PairSplit: a preference objective's pairs
    eval: Split | PairSplit | None  # the unnamed eval set (eval_files, eval_sources, val_fraction)
    metas: list[dict[str, Any]] = field(default_factory=list)  # train, eval, named sets
    named: dict[str, Split | PairSplit] = field(default_factory=dict)  # data.eval_sets, in order

    def eval_sets(self) -> dict[str, Split | PairSplit]:
        """Every eval set by its metric key: `eval/loss` (the unnamed set) first, then
        `eval/<name>/loss`. The first is the one `checkpoint.keep_best` ranks by."""
        first = {"eval/loss": self.eval} if self.eval is not None else {}
        return first | {f"eval/{n}/loss": split for n, split in self.named.items()}


def cache_context(cfg: Config, tokenizer: Any) -> CacheContext:
    d = cfg.data
    if d.chat_template == "tokenizer":
        template = getattr(tokenizer, "chat_template", None) or None
    else:
        template = chat_template(tokenizer, d.chat_template)
    settings = EncodeSettings(d.max_seq_len, d.train_on, d.too_long, template)
    num_proc = resolve_num_proc(d.num_proc)
    return CacheContext.create(tokenizer, settings, d.on_bad_record, cache_root(d), num_proc)


def build(
    cfg: Config, tokenizer: Any, log: Callable[[str], None] = lambda _: None
) -> list[BuildResult]:
    """Build every missing cache entry of the config's sources (train, then eval sets)."""
    ctx = cache_context(cfg, tokenizer)
    results = []
    for spec in all_specs(cfg.data):
        result = build_entry(spec, ctx, log)
        m = result.meta
        if result.built:
            rate = m["tokens"] / max(m["build_seconds"], 1e-9)
            pairs = f" ({m['pairs']:,} preference pairs)" if m["pairs"] else ""
            log(f"preprocessed {spec.label}: {m['samples']:,} samples{pairs}, {m['tokens']:,} "
                f"tokens in {m['build_seconds']:.1f}s ({rate:,.0f} tokens/s)")  # fmt: skip
        results.append(result)
    return results


def _weighted(n: int, weight: float, rng: np.random.Generator) -> np.ndarray:
    whole = int(weight)
    count = max(1, round(weight * n))
    extra = np.sort(rng.choice(n, size=count - whole * n, replace=False))
    return np.concatenate([np.tile(np.arange(n), whole), extra]).astype(np.int64)


def _entry(spec: SourceSpec, ctx: CacheContext, method: str) -> tuple[TokenArrays, dict]:
    """A cached source, which must hold pairs exactly when the objective trains on them
    (`data.format: auto` reads a file of pairs as pairs, whatever the objective)."""
    arrays, meta = load_entry(spec, ctx)
    if meta.get("pairs") and method == "sft":
        raise DataError(
            f"{spec.label}: holds preference pairs; set objective.method "
            "(dpo, simpo, orpo or reward)"
        )
    if not meta.get("pairs") and method != "sft":
        raise DataError(
            f"{spec.label}: holds no preference pairs, which objective.method {method} "
            "trains on (data.format: preference)"
        )
    return arrays, meta


def load(cfg: Config, tokenizer: Any) -> DataSplits:
    """Memory-map the cached sources and assemble the train and eval splits."""
    ctx = cache_context(cfg, tokenizer)
    trains, evals, metas = [], [], []
    pairs = cfg.objective.preference  # units are pairs: rows 2k, 2k+1 (distft.data.pairs)
    rows_of = pair_rows if pairs else (lambda units: units)
    for i, spec in enumerate(source_specs(cfg.data, "train")):
        arrays, meta = _entry(spec, ctx, cfg.objective.method)
        metas.append(meta)
        n = len(arrays) // 2 if pairs else len(arrays)
        units = np.arange(n)
        rng = np.random.default_rng([cfg.seed, 1, i])
        if cfg.data.val_fraction:
            n_val = max(1, round(cfg.data.val_fraction * n))
            if n_val >= n:
                raise DataError(
                    f"{spec.label}: {n} {'pairs' if pairs else 'samples'} are too few to hold "
                    f"out data.val_fraction={cfg.data.val_fraction} for eval"
                )
            held = np.zeros(n, dtype=bool)
            held[rng.choice(n, size=n_val, replace=False)] = True
            evals.append(Split([arrays]).select(rows_of(units[held])))
            units = units[~held]
        picked = units[_weighted(len(units), spec.weight, rng)]
        trains.append(Split([arrays]).select(rows_of(picked)))
    for spec in source_specs(cfg.data, "eval"):
        arrays, meta = _entry(spec, ctx, cfg.objective.method)
        metas.append(meta)
        evals.append(Split([arrays]))
    named: dict[str, Split] = {}
    for name, specs in eval_set_specs(cfg.data).items():
        parts = []
        for spec in specs:
            arrays, meta = _entry(spec, ctx, cfg.objective.method)
            metas.append(meta)
            parts.append(Split([arrays]))
        named[name] = Split.concat(parts)
    train, evaluated = Split.concat(trains), Split.concat(evals) if evals else None
    if not pairs:
        return DataSplits(train, evaluated, metas, dict(named))
    return DataSplits(
        PairSplit(train),
        None if evaluated is None else PairSplit(evaluated),
        metas,
        {name: PairSplit(split) for name, split in named.items()},
    )


def prepare(cfg: Config, tokenizer: Any, dist: DistContext) -> DataSplits:
    """Build (local rank 0 of each node), wait, load (every rank)."""
    if dist.local_rank == 0:
        build(cfg, tokenizer, dist.log)
    dist.barrier()
    return load(cfg, tokenizer)


VALIDATE_FIRST, VALIDATE_EVERY = 2000, 100  # samples encoded per source by check_records


def check_records(cfg: Config) -> None:
    """What the workers would refuse about the local sources' records, before any worker
    starts: every record is parsed, and the first 2,000 samples of each source plus every
    100th after them are encoded with the run's tokenizer and chat template (rendering,
    label masking, truncation), so a record the template refuses is reported by `file:line`.

    The tokenizer is used when it is a local folder or in the Hugging Face cache; otherwise
    (and for hub datasets, whose reading may need a download) that is left to the workers.
    Sources already tokenized with these settings are skipped. (The CLI checks local
    model and tokenizer folders' files before this: `model_files.check_local_files`.)"""
    data = cfg.data
    root = cache_root(data)
    tokenizer = _local_tokenizer(cfg)
    ctx = cache_context(cfg, tokenizer) if tokenizer is not None else None
    for spec in all_specs(data):
        if spec.hub is not None:
            continue
        if ctx is None and is_checked(root, spec, data.on_bad_record):
            continue
        if ctx is not None and (root / ctx.key(spec)).is_dir():
            continue
        report = ReadReport()
        samples = parse(spec.raws(), spec.format, spec.fields, data.on_bad_record, report,
                        spec.max_samples)  # fmt: skip
        if ctx is None:
            for _ in samples:
                pass
        else:
            encoder = Encoder(ctx.tokenizer, ctx.settings)
            for _ in encoder.encode_many(_sampled(samples), data.on_bad_record, TokenizeReport()):
                pass
        if report.records == 0:
            raise DataError(f"{spec.label}: no usable records")


def _sampled(samples: Iterable[Sample]) -> Iterator[Sample]:
    """The first VALIDATE_FIRST samples, then every VALIDATE_EVERY-th (all are parsed)."""
    for i, sample in enumerate(samples):
        if i < VALIDATE_FIRST or (i - VALIDATE_FIRST) % VALIDATE_EVERY == VALIDATE_EVERY - 1:
            yield sample


def _local_tokenizer(cfg: Config) -> Any:
    """The run's tokenizer if it can be loaded without a download, else None."""
    name = cfg.model.tokenizer or cfg.model.name_or_path
    if not Path(name).is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "tokenizer_config.json", revision=cfg.model.revision)
        if not isinstance(cached, str):
            return None
    from distft.model import load_tokenizer

    key = "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path"
    try:
        return load_tokenizer(cfg)
    except Exception as e:  # noqa: BLE001 - files that parse can still fail to load in many
        # ways (KeyError in transformers, the Rust library's own errors): one line, no trace
        raise DataError(f"{key}: cannot load tokenizer {name!r}: {_reason(e)}") from None


def _reason(e: Exception) -> str:
    """The first line of an error (with its type where the message alone is unclear)."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(e, (OSError, ValueError)) and first:
        return first
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def read_conversations(
    files: list[str],
    fmt: str = "auto",
    on_bad_record: str = "error",
    fields: dict[str, str] | None = None,
) -> tuple[list[Sample], ReadReport]:
    """All records of `files` (files or folders), in order, as samples."""
    report = ReadReport()
    raws = (raw for name in files for f in data_files(Path(name)) for raw in file_records(f))
    out = list(parse(raws, fmt, fields, on_bad_record, report))
    if not out:
        raise DataError(f"{', '.join(files)}: no usable records")
    return out, report
