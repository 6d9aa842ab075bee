"""Data statistics, computed once before training: printed on rank 0 and logged (step 0)."""

from __future__ import annotations

from typing import Any

import numpy as np

from distft.data.loader import TrainBatches
from distft.data.pairs import PairSplit
from distft.data.pipeline import DataSplits


def describe(splits: DataSplits, batches: TrainBatches) -> tuple[dict[str, float], list[str]]:
    """(metrics for the logger, lines for the log)."""
    train, lengths = splits.train, splits.train.lengths
    pairs = isinstance(train, PairSplit)  # a unit is a pair; its targets: its reply tokens
    targets_of = train.target_tokens if isinstance(train, PairSplit) else train.targets
    tokens, targets = int(lengths.sum()), int(targets_of.sum())
    unit = "pairs" if pairs else "samples"
    real, cells = batches.tensor_tokens(0)
    counts = {k: sum(int(m[k]) for m in splits.metas) for k in ("skipped", "truncated", "dropped")}
    q = np.percentile(lengths, [50, 90]) if len(lengths) else np.zeros(2)
    metrics: dict[str, float] = {
        "data/train_samples": len(train),
        "data/train_tokens": tokens,
        "data/train_target_tokens": targets,
        "data/eval_samples": sum(len(s) for s in splits.eval_sets().values()),
        **{f"data/eval/{n}/samples": len(s) for n, s in splits.named.items()},
        "data/len_min": int(lengths.min()),
        "data/len_median": float(q[0]),
        "data/len_p90": float(q[1]),
        "data/len_max": int(lengths.max()),
        "data/units_per_epoch": batches.units_per_epoch,
        "data/non_pad_fraction": real / max(cells, 1),
        **{f"data/{k}": v for k, v in counts.items()},
    }
    lines = [
        f"data: train {len(train):,} {unit}, {tokens:,} tokens, {targets:,} trained "
        f"({100 * targets / max(tokens, 1):.1f}%); eval {metrics['data/eval_samples']:,} {unit}"
        + "".join(f", {n} {len(s):,}" for n, s in splits.named.items()),
        f"data: lengths min {metrics['data/len_min']} / median {q[0]:.0f} / p90 {q[1]:.0f} / "
        f"max {metrics['data/len_max']}; skipped {counts['skipped']}, truncated "
        f"{counts['truncated']}, dropped {counts['dropped']} (over max_seq_len)",
        f"data: batching {batches.batching}: {batches.units_per_epoch:,} "
        f"{_unit_name(batches.batching)} per epoch, {batches.steps_per_epoch:,} steps per "
        f"epoch, {100 * metrics['data/non_pad_fraction']:.1f}% of batch tokens are not padding",
    ]
    if batches.batching == "packed":
        fill = tokens / max(batches.units_per_epoch * batches.max_seq_len, 1)
        metrics["data/pack_fill"] = fill
        lines[-1] += f"; packs {100 * fill:.1f}% full"
    lines += [f"data: skipped {msg}" for m in splits.metas for msg in m.get("first_skipped", [])]
    return metrics, lines


def _unit_name(batching: str) -> str:
    return {"packed": "packs", "length_grouped": "micro-batches"}.get(batching, "samples")


def source_lines(metas: list[dict[str, Any]]) -> list[str]:
    return [
        f"{m['source']}: {m['samples']:,} samples, {m['tokens']:,} tokens "
        f"({m['skipped']} skipped, {m['truncated']} truncated, {m['dropped']} dropped)"
        for m in metas
    ]
