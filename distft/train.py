"""The training loop: one loop for full fine-tuning and LoRA alike.

Loss normalisation (per optimizer step, over *global* target tokens):

    Let T = sum over all ranks r and micro-batches j of the target tokens t_rj, and
    S_rj the summed token NLL of micro-batch j on rank r. The loss we want is
        L = (1/T) * sum_rj S_rj
    DeepSpeed averages gradients over the W data-parallel ranks, so each rank
    back-propagates  l_rj = S_rj * W / T  (with scale_wrt_gas=False, no 1/G scaling):
        grad = (1/W) * sum_r sum_j grad(l_rj) = (1/T) * sum_rj grad(S_rj) = grad(L).
    T is known before the first backward of the step: each rank counts the targets of
    its G micro-batches and one all-reduce sums them. A padded or short micro-batch
    therefore weighs exactly its token count, whatever the (micro x accum x world) split.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from distft.config import Config
from distft.data import Batch, TrainBatches
from distft.dist import DistContext
from distft.flops import Throughput
from distft.metrics import MetricsLogger


def nll_sum(model: Any, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over the batch's target tokens, and their count."""
    logits = model(**batch.model_inputs()).logits  # ids, mask, position ids (packed)
    logits = logits[:, :-1].float()
    targets = batch.labels[:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, int((targets != -100).sum())


@torch.no_grad()
def evaluate(engine: Any, batches: list[Batch], dist: DistContext) -> float:
    """Token-weighted mean NLL over the whole eval split (all ranks)."""
    was_training = engine.module.training
    engine.module.eval()
    total = count = 0.0
    for b in batches:
        s, n = nll_sum(engine, b.to(dist.device))
        total, count = total + s.item(), count + n
    engine.module.train(was_training)
    total, count = dist.sum([total, count])
    return total / max(count, 1.0)


def train(
    cfg: Config,
    dist: DistContext,
    engine: Any,
    data: TrainBatches,
    eval_data: list[Batch],
    logger: MetricsLogger,
    start_step: int,
    on_step_end: Callable[[int, dict[str, float]], bool],
) -> dict[str, float]:
    """Run optimizer steps `start_step..data.total_steps`. `on_step_end(step, metrics)`
    (checkpoints, preemption) returns True to stop early. Returns the last step's metrics."""
    world = dist.world_size
    progress = _progress(dist, data.total_steps, cfg.logging.every_n_steps)
    perf = Throughput.for_run(cfg, engine.module, dist, data.pad_id)  # FLOPs, MFU, memory
    engine.module.train()
    summary: dict[str, float] = {}
    step = start_step
    while step < data.total_steps:
        t0 = time.perf_counter()
        micro_batches = [b.to(dist.device) for b in data.for_step(step)]
        local_targets = sum(b.n_targets for b in micro_batches)
        local_tokens = sum(b.n_tokens for b in micro_batches)
        local_flops = perf.flops(micro_batches)
        global_targets, global_tokens, global_flops = dist.sum(
            [local_targets, local_tokens, local_flops]
        )

        loss_sum = 0.0
        for b in micro_batches:
            s, _ = nll_sum(engine, b)
            engine.backward(s * (world / global_targets), scale_wrt_gas=False)
            engine.step()  # DeepSpeed steps the optimizer and lr at the accumulation boundary
            loss_sum += s.item()
        step += 1

        loss_total, *peak_mem = dist.sum([loss_sum, *perf.memory_by_rank()])
        dt = time.perf_counter() - t0
        metrics = {
            "train/loss": loss_total / global_targets,
            "train/lr": engine.get_lr()[0],
            "train/grad_norm": _grad_norm(engine),
            "train/step_time_s": dt,
            "train/target_tokens_per_s": global_targets / dt,
            "train/tokens_per_s": global_tokens / dt,
            "train/samples_seen": data.samples_seen(step),
            "train/epoch": step / data.steps_per_epoch,
            **perf.metrics(dt, global_tokens, global_flops, peak_mem),
        }
        if cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0 and eval_data:
            metrics["eval/loss"] = evaluate(engine, eval_data, dist)
        if step % cfg.logging.every_n_steps == 0 or step == data.total_steps:
            logger.log(metrics, step)
        progress(step, metrics)
        summary = metrics
        if on_step_end(step, metrics):
            break
    return summary


def _grad_norm(engine: Any) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def _progress(dist: DistContext, total: int, every: int) -> Callable[[int, dict], None]:
    """One progress line every `every` steps on rank 0 (readable in Ray, Slurm and CI
    logs, where a redrawn bar is not)."""
    t0 = time.perf_counter()
    width = len(str(total))

    def update(step: int, metrics: dict) -> None:
        if step % every and step != total:
            return
        elapsed = time.perf_counter() - t0
        done = step / total
        eta = elapsed / max(done, 1e-9) * (1 - done) if step else 0.0
        extra = f" eval {metrics['eval/loss']:.4f}" if "eval/loss" in metrics else ""
        dist.log(
            f"step {step:>{width}}/{total} {100 * done:3.0f}% "
            f"loss {metrics['train/loss']:.4f}{extra} lr {metrics['train/lr']:.2e} "
            f"{metrics['train/tokens_per_s']:,.0f} tok/s eta {eta:.0f}s"
        )

    return update
