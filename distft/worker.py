"""The worker entry: the same function for every launch path (local Ray, Ray cluster,
Slurm). Builds everything in order and hands control to the loop."""

from __future__ import annotations

import hashlib
import json
import random
import time
from typing import Any

import numpy as np
import torch

from distft import dist as distmod
from distft.checkpoint import CheckpointCoordinator, TrainState
from distft.config import Config
from distft.data import TrainBatches, eval_batches, load_split
from distft.engine import build_ds_config, create_engine
from distft.export import save_final
from distft.metrics import make_logger
from distft.model import build_model, count_params, load_tokenizer
from distft.train import evaluate, train


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fingerprint(cfg: Config) -> dict[str, str]:
    """What must not change between a checkpoint and its resume (trajectory-relevant)."""

    def h(obj: Any) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[
            :16
        ]

    d = cfg.redacted()
    return {
        "model": h(d["model"]),
        "lora": h(d["lora"]),
        "data": h(d["data"]),
        "optim": h(d["optim"]),
        "batch": h(d["batch"]),
        "seed": h(d["seed"]),
    }


def run_worker(train_loop_config: dict[str, Any]) -> None:
    cfg: Config = train_loop_config["config"]
    t_start = time.perf_counter()
    dist = distmod.init(cfg.cluster.use_gpu)
    seed_everything(cfg.seed)

    ds_config, overridden = build_ds_config(cfg, dist.world_size)
    if overridden:
        dist.log(f"deepspeed.ds_config overrides generated keys: {', '.join(overridden)}")
    tokenizer = load_tokenizer(cfg)
    train_ds = load_split(cfg, tokenizer, cfg.data.train_files)
    eval_ds = load_split(cfg, tokenizer, cfg.data.eval_files) if cfg.data.eval_files else None
    dist.log(f"train data: {train_ds.info.description}")
    batches = TrainBatches(train_ds, cfg, dist, tokenizer.pad_token_id)
    evals = (
        eval_batches(eval_ds, cfg.eval.micro_batch_size, dist, tokenizer.pad_token_id)
        if eval_ds is not None
        else []
    )

    model = build_model(cfg, ds_config)
    trainable, total = count_params(model)
    dist.log(f"params: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")
    engine = create_engine(model, cfg, ds_config, batches.total_steps)

    ckpts = CheckpointCoordinator(cfg.output_dir / "checkpoints", dist, cfg.checkpoint.keep_last)
    state = TrainState(world_size=dist.world_size, fingerprint=fingerprint(cfg))
    resume_from = ckpts.find_resume("auto")
    if resume_from is not None:
        state = ckpts.load(engine, resume_from)
        dist.log(f"resumed from {resume_from} at step {state.step}")
    logger = make_logger(cfg, dist)
    dist.log(f"ready in {time.perf_counter() - t_start:.1f}s; {batches.total_steps} steps")

    if evals and state.step == 0:
        logger.log({"eval/loss": evaluate(engine, evals, dist)}, 0)

    def on_step_end(step: int) -> bool:
        state.step, state.samples_seen = step, step * batches.global_batch
        every = cfg.checkpoint.every_n_steps
        if every and step % every == 0 and step < batches.total_steps:
            ckpts.save(engine, state)
        return False

    train(cfg, dist, engine, batches, evals, logger, state.step, on_step_end)
    if evals:
        logger.log({"eval/loss": evaluate(engine, evals, dist)}, state.step)
    ckpts.save(engine, state)
    if cfg.checkpoint.save_final_model:
        save_final(engine, tokenizer, cfg.output_dir / "final", dist, lora=cfg.lora.enabled)
    logger.close()
