"""`distft preprocess`: build the preprocessing cache ahead of training, on one machine,
without Ray or GPUs, and print what the workers will see."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from distft.config import Config
from distft.data.loader import TrainBatches
from distft.data.pipeline import build, load
from distft.data.stats import describe, source_lines
from distft.dist import DistContext


def preprocess(cfg: Config, log: Callable[[str], None]) -> dict[str, float]:
    """Tokenize every source into the cache (reusing entries that exist); returns the
    data statistics the training run will log."""
    from distft.model import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    t0 = time.perf_counter()
    results = build(cfg, tokenizer, log)
    reused = [r.meta for r in results if not r.built]
    for line in source_lines(reused):
        log(f"cached {line}")
    splits = load(cfg, tokenizer)
    # Only the data-parallel size matters for the batch layout; rank 0 stands in for all.
    data_parallel = cfg.cluster.num_workers // cfg.deepspeed.sequence_parallel_size
    world = DistContext(0, data_parallel, 0, torch.device("cpu"))
    batches = TrainBatches(splits.train, cfg, world, tokenizer.pad_token_id)
    metrics, lines = describe(splits, batches)
    for line in lines:
        log(line)
    log(f"data ready in {time.perf_counter() - t0:.1f}s ({cfg.data.cache_dir or 'default cache'})")
    return metrics
