"""The worker entry: the same function for every launch path (local Ray, Ray cluster,
Slurm). Builds everything in order and hands control to the loop."""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
import torch

from distft import dist as distmod
from distft import seqpar, watchdog
from distft.checkpoint import CheckpointCoordinator, TrainState, preempt
from distft.checkpoint.fingerprint import fingerprint
from distft.config import Config
from distft.data import describe, prepare
from distft.engine import build_ds_config, create_engine
from distft.export import save_final
from distft.launch.preflight import preflight
from distft.metrics import make_logger
from distft.model import build_model, count_params, load_tokenizer
from distft.objectives.reference import objective_for
from distft.train import evaluate_all, train


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_worker(train_loop_config: dict[str, Any]) -> None:
    cfg: Config = train_loop_config["config"]
    t_start = time.perf_counter()
    dist = distmod.init(cfg.cluster.use_gpu, cfg.deepspeed.sequence_parallel_size)
    laps = [("dist init", time.perf_counter())]  # start-up phases, for the "ready" line
    restarts = preflight(cfg.output_dir, dist, train_loop_config.get("launch_id"))
    laps.append(("preflight", time.perf_counter()))
    seed_everything(cfg.seed)

    ds_config, overridden = build_ds_config(cfg, dist.dp_world_size)
    if overridden:
        dist.log(f"deepspeed.ds_config overrides generated keys: {', '.join(overridden)}")
    tokenizer = load_tokenizer(cfg)
    data = prepare(cfg, tokenizer, dist)  # the preprocessing cache; one builder per node
    batches = seqpar.train_batches(data.train, cfg, dist, tokenizer.pad_token_id)
    data_stats, data_lines = describe(data, batches)
    for line in data_lines:
        dist.log(line)
    laps.append(("data", time.perf_counter()))

    model = build_model(cfg, ds_config)
    laps.append(("model", time.perf_counter()))
    trainable, total = count_params(model)
    dist.log(f"params: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")
    mpu = seqpar.register(model, cfg, dist)  # None without sequence parallelism
    engine = create_engine(model, cfg, ds_config, batches.total_steps, mpu)
    laps.append(("deepspeed", time.perf_counter()))
    # before the restore: DPO's precomputed reference is the starting weights
    objective = objective_for(cfg, engine, data, dist, ds_config, tokenizer.pad_token_id)
    evals = {  # by metric key; the first is the one keep_best ranks by
        key: seqpar.eval_set(split, cfg, dist, tokenizer.pad_token_id)
        for key, split in data.eval_sets().items()
    }
    best_key = next(iter(evals), None)
    laps.append(("objective", time.perf_counter()))

    ckpts = CheckpointCoordinator(
        cfg.output_dir / "checkpoints", dist, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best
    )
    fresh = TrainState(world_size=dist.world_size, fingerprint=fingerprint(cfg))
    state = ckpts.restore(engine, cfg, fresh, restarted=restarts > 0)
    logger = make_logger(cfg, dist, resumed_at=state.step)
    run_id_file = cfg.output_dir / "wandb_run_id"  # written by make_logger on rank 0
    state.wandb_run_id = run_id_file.read_text().strip() if run_id_file.is_file() else None
    if state.step == 0:
        logger.log(data_stats, 0)
    laps.append(("restore+logger", time.perf_counter()))
    starts = [t_start] + [t for _, t in laps]
    split = ", ".join(f"{n} {t - t0:.2f}s" for (n, t), t0 in zip(laps, starts, strict=False))
    dist.log(f"ready in {laps[-1][1] - t_start:.1f}s ({split}); {batches.total_steps} steps")

    stopped_by: list[str] = []
    drain: list[str] = []  # a Ray node drain this rank was told of (preempt.drain_announced)

    def on_step_end(step: int, evals: dict[str, float], preempted: bool) -> bool:
        """Checkpoint cadence and early stops; True stops the loop (the same on all ranks:
        `preempted` is the loop's all-reduced vote). `evals`: measured at this step."""
        state.step, state.epoch = step, batches.epoch_of(step)
        state.samples_seen = batches.samples_seen(step)
        if best_key in evals:  # measured at this step: a keep_best candidate
            state.record_eval(evals[best_key])
        if preempted:
            stopped_by.append("preemption")
        elif step == cfg.batch.stop_after_steps and step < batches.total_steps:
            stopped_by.append("batch.stop_after_steps")
        every = cfg.checkpoint.every_n_steps
        if stopped_by or (every and step % every == 0 and step < batches.total_steps):
            with watchdog.phase("save", step):  # a stop's save is written before it stops
                logger.flush()  # metrics.jsonl is never behind a committed checkpoint
                ckpts.save(
                    engine, state, in_background=cfg.checkpoint.async_save and not stopped_by
                )
        if preempted and drain:  # tells the launcher: a Ray drain, not a signal
            preempt.note_drain(cfg.output_dir, f"{drain[0]}; checkpoint committed at step {step}")
        return bool(stopped_by)

    def stop_requested() -> bool:
        if not drain and (why := preempt.drain_announced()):
            drain.append(why)
        return bool(drain) or preempt.requested(cfg.output_dir)

    with watchdog.watching(cfg.watchdog, cfg.output_dir, dist.rank, dist.world_size):
        if evals and state.step == 0:
            with watchdog.phase("eval", 0):
                logger.log(evaluate_all(engine, evals, dist, objective), 0)
        last = train(
            cfg,
            dist,
            engine,
            batches,
            evals,
            objective,
            logger,
            state.step,
            stop_requested,
            on_step_end,
        )
        if stopped_by:
            dist.log(f"stopped at step {state.step} ({stopped_by[0]}); checkpoint committed")
            logger.close()
            return
        if evals:
            # the loop's own eval at the last step (eval.every_n_steps dividing it) is the
            # final one: evaluated and logged once
            final_evals = {k: v for k, v in last.items() if k.startswith("eval/")}
            if not final_evals:
                with watchdog.phase("eval", state.step):
                    final_evals = evaluate_all(engine, evals, dist, objective)
                logger.log(final_evals, state.step)
            state.record_eval(next(iter(final_evals.values())))  # best_key's
        state.finished_at_step = state.step  # the schedule is complete: a rerun has nothing to do
        with watchdog.phase("save", state.step):
            logger.flush()
            ckpts.save(engine, state)
            if cfg.checkpoint.save_final_model:
                with seqpar.whole_sequences():  # its check runs whole probe sequences
                    save_final(engine, tokenizer, cfg, dist)
    logger.close()
