"""The training loop: one loop for full fine-tuning and LoRA, and for every objective
(`distft.objectives`: SFT, or preference pairs; the loop does not branch on the method).

Loss normalisation (per optimizer step, over *global* target tokens; for preference
objectives read "pairs" for "target tokens": a pair counts 1 in `step_totals`):

    Let T = sum over all ranks r and micro-batches j of the target tokens t_rj, and
    S_rj the summed token NLL of micro-batch j on rank r. The loss we want is
        L = (1/T) * sum_rj S_rj
    DeepSpeed averages gradients over the W data-parallel ranks, so each rank
    back-propagates  l_rj = S_rj * W / T  (with scale_wrt_gas=False, no 1/G scaling):
        grad = (1/W) * sum_r sum_j grad(l_rj) = (1/T) * sum_rj grad(S_rj) = grad(L).
    T is known before the first backward of the step without any communication: the
    batch order is a pure function of (seed, epoch, step), so every rank sums the targets
    of every rank's samples (`TrainBatches.step_totals`). A padded or short micro-batch
    therefore weighs exactly its token count, whatever the (micro x accum x world) split.
    With sequence parallelism W is the data-parallel size (all ranks / P): DeepSpeed sums
    gradients over all ranks and divides by W, each rank's S_rj covers its slice of the
    sequences, and the slices' sums add up to the whole sequences' (`distft.seqpar`).

The next step's micro-batches are collated in a background thread while a step runs
(`distft.data.prefetch`: one step ahead) and moved to the device one micro-batch at a
time; metrics are written by the logger's own thread (`distft.metrics.writer`).

Communication per step beyond DeepSpeed's own: one all-reduce started after the optimizer
step (loss and metric sums, each rank's peak memory, and the vote to stop) and read one
step later (`StepRow`, `DistContext.sum_later`): no step ends waiting for it, and on a GPU
neither it nor the gradient norm makes the host wait for the device at the step's end (nor
do the objectives: `distft.data.batch.Targets`, found on the host). A preemption vote
therefore stops the ranks one step after it was cast (all on the same step); a
checkpoint's flush still writes its step's row first.
Each step and in-loop eval is a phase of the hang watchdog (`distft.watchdog`): a clock
read, no communication.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from distft import faults, watchdog
from distft.config import Config
from distft.console_lines import progress_line
from distft.data import Batch, TrainBatches
from distft.data.loader import StepTotals
from distft.data.prefetch import Prefetcher, to_device
from distft.dist import DistContext, PendingSum
from distft.flops import Throughput
from distft.metrics import MetricsLogger
from distft.objectives import Objective


@torch.no_grad()
def evaluate(
    engine: Any, batches: list[Batch], dist: DistContext, objective: Objective
) -> dict[str, float]:
    """The mean loss over the whole eval split (all ranks), per target token (SFT) or per
    pair, and the objective's metrics over the same units. The sums stay on the device
    until the end (one read, with the all-reduce), and each batch is copied there
    non-blocking (`to_device`): on a GPU no batch waits for the one before."""
    was_training = engine.module.training
    engine.module.eval()
    sums = torch.zeros(2 + len(objective.metrics), dtype=torch.float64, device=dist.device)
    counted = 0  # units counted on the host (SFT's target tokens)
    for b in batches:
        out = objective(engine, to_device(b, dist.device))
        if isinstance(out.units, torch.Tensor):
            units = out.units
        else:
            units, counted = sums.new_zeros(()), counted + out.units
        parts = [out.total.detach(), units, *(out.sums[k] for k in objective.metrics)]
        sums += torch.stack([t.to(torch.float64) for t in parts])
    engine.module.train(was_training)
    sums[1] += counted
    loss, n, *values = dist.sum_later(sums, sums.new_zeros(0)).result()[0]
    return {"loss": loss / max(n, 1.0)} | {
        k: v / max(n, 1.0) for k, v in zip(objective.metrics, values, strict=True)
    }


def evaluate_all(
    engine: Any, sets: dict[str, list[Batch]], dist: DistContext, objective: Objective
) -> dict[str, float]:
    """Each eval set's loss by its metric key (`eval/loss`, `eval/<name>/loss`), in order,
    each followed by the objective's metrics (`eval/<name>/rewards/accuracy`, ...)."""
    out: dict[str, float] = {}
    for key, batches in sets.items():
        prefix = key.removesuffix("loss")
        out |= {prefix + k: v for k, v in evaluate(engine, batches, dist, objective).items()}
    return out


def train(
    cfg: Config,
    dist: DistContext,
    engine: Any,
    data: TrainBatches,
    eval_data: dict[str, list[Batch]],
    objective: Objective,
    logger: MetricsLogger,
    start_step: int,
    stop_requested: Callable[[], bool],
    on_step_end: Callable[[int, dict[str, float], bool], bool],
) -> dict[str, float]:
    """Run optimizer steps `start_step..data.total_steps`. `stop_requested()` is this
    rank's wish to stop (preemption), agreed on in the step's all-reduce;
    `on_step_end(step, eval_metrics, any_rank_asked_to_stop)` (checkpoints, early stops)
    returns True to stop; the vote it gets is the previous step's (read one step late, as
    all the step's scalars are: `StepRow`), except at the last step, which reads its own.
    Returns the last step's metrics."""
    world = dist.dp_world_size  # what DeepSpeed divides the summed gradients by
    progress = _progress(dist, start_step, data.total_steps, cfg.logging.every_n_steps)
    perf = Throughput.for_run(cfg, engine.module, dist)  # FLOPs, MFU, memory
    engine.module.train()
    step, previous = start_step, None
    with Prefetcher(data, dist.device) as batches:  # the next step's, collated meanwhile
        while step < data.total_steps:
            watchdog.begin("step", step + 1)  # ended once the previous step's row is read
            faults.maybe_hang(step + 1, dist.rank, cfg.output_dir)
            t0 = time.perf_counter()
            micro_batches = batches.take(step)  # host (pinned), or in place on CPU
            totals = data.step_totals(step)  # all ranks' targets: computed, not communicated
            scale = world / totals.targets

            loss_sum = torch.zeros((), device=dist.device)
            sums = torch.zeros(len(objective.metrics), device=dist.device)
            own_norm = None
            for host_batch in micro_batches:  # on the device one at a time
                b = batches.to_device(host_batch)
                out = objective(engine, b)
                engine.backward(out.total * scale, scale_wrt_gas=False)
                if engine.is_gradient_accumulation_boundary():
                    own_norm = _norm_deepspeed_does_not_report(engine)
                engine.step()  # DeepSpeed steps the optimizer and lr at the accumulation boundary
                loss_sum += out.total.detach()  # no host sync per micro-batch
                for i, key in enumerate(objective.metrics):
                    sums[i] += out.sums[key]
            step += 1

            # The step's scalars, all-reduced while the next step runs (no wait here)
            host = [float(stop_requested()), *perf.memory_by_rank()]
            norm = _grad_norm(engine, own_norm)
            if isinstance(norm, float):
                norm = dist.on_device([norm])
            pending = dist.sum_later(
                torch.cat([loss_sum.view(1).double(), sums.double(), dist.on_device(host)]),
                sums.new_zeros(0) if norm is None else norm.view(1),
            )
            dt = time.perf_counter() - t0
            known = {  # on the host now
                "train/lr": engine.get_lr()[0],
                "train/step_time_s": dt,
                "train/target_tokens_per_s": totals.targets / dt,
                "train/tokens_per_s": totals.tokens / dt,
                "train/samples_seen": data.samples_seen(step),
                "train/epoch": step / data.steps_per_epoch,
            }
            row = StepRow(step, dt, totals, objective.metrics, pending, perf, known)
            votes = row.stop_votes() if step == data.total_steps else 0.0  # the last: now
            if previous is not None:
                votes += previous.stop_votes()
                progress(previous.step, previous.metrics())
            watchdog.end()
            if cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0 and eval_data:
                with watchdog.phase("eval", step):
                    row.evals = evaluate_all(engine, eval_data, dist, objective)
            if step % cfg.logging.every_n_steps == 0 or step == data.total_steps:
                logger.log(row.metrics, step)  # read and written by the logger's thread
            previous = row
            if on_step_end(step, row.evals, votes > 0):
                break
    if previous is None:
        return {}
    progress(previous.step, previous.metrics())
    return previous.metrics()


class StepRow:
    """One step's metrics, read when first asked for (`metrics`): its scalars arrive with
    the all-reduce started at its end (`DistContext.sum_later`), which the loop reads a
    step later, the logger's thread when it writes the row, or a flush before a
    checkpoint commits (so metrics.jsonl is never behind a committed step)."""

    def __init__(
        self,
        step: int,
        dt: float,
        totals: StepTotals,
        names: tuple[str, ...],
        pending: PendingSum,
        perf: Throughput,
        known: dict[str, float],
    ):
        """`pending`: [loss sum, the objective's metric sums (`names`), stop vote, each
        rank's peak memory] summed over ranks, and [the grad norm] where one was measured;
        `known`: the metrics the host has already."""
        self.step, self._dt, self._totals, self._names = step, dt, totals, names
        self._pending, self._perf, self._known = pending, perf, known
        self.evals: dict[str, float] = {}  # measured at this step, synchronously
        self._metrics: dict[str, float] | None = None

    def stop_votes(self) -> float:
        return self._pending.result()[0][1 + len(self._names)]

    def metrics(self) -> dict[str, float]:
        if self._metrics is None:  # two threads may both build it: the same dict
            self._metrics = self._build()
        return self._metrics

    def _build(self) -> dict[str, float]:
        summed, kept = self._pending.result()
        n, targets, perf = len(self._names), self._totals.targets, self._perf
        loss_total, method_sums, peak_mem = summed[0], summed[1 : 1 + n], summed[2 + n :]
        return {
            "train/loss": loss_total / targets,
            **{f"train/{k}": v / targets for k, v in zip(self._names, method_sums, strict=True)},
            **({"train/grad_norm": kept[0]} if kept else {}),
            **self._known,
            **perf.metrics(self._dt, self._totals.tokens, perf.flops(self._totals), peak_mem),
            **self.evals,
        }


def _norm_deepspeed_does_not_report(engine: Any) -> torch.Tensor | None:
    """Before the boundary's `engine.step()`: the global gradient norm when DeepSpeed will
    not report one, else None. Its ZeRO and bf16/fp16 optimizers measure the norm, clipping
    or not; without ZeRO in fp32 it steps the torch optimizer itself and reports None
    (`get_global_grad_norm` copies the optimizer's `_global_grad_norm`). The gradients are
    all-reduced by the boundary's backward, so every rank computes the same norm. A tensor
    on the device: read with the step's other scalars, without a sync now."""
    if hasattr(engine.optimizer, "_global_grad_norm"):
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
    return torch.linalg.vector_norm(norms)


def _grad_norm(engine: Any, own_norm: torch.Tensor | None) -> torch.Tensor | float | None:
    """The step's gradient norm before clipping; None (not logged) where nobody measured
    it (ZeRO-1/2 with a raw `compute_grad_norm: false`). A device tensor stays one (read
    later, with the step's all-reduce); DeepSpeed's float stays a float."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return own_norm
    return norm.float() if isinstance(norm, torch.Tensor) else float(norm)


def _progress(dist: DistContext, start: int, total: int, every: int) -> Callable[[int, dict], None]:
    """A progress line every `every` steps on rank 0 (distft.console_lines.progress_line;
    the driver redraws it in place on a terminal)."""
    t0 = time.perf_counter()

    def update(step: int, metrics: dict) -> None:
        if step % every == 0 or step == total:
            dist.log(progress_line(step, total, metrics, time.perf_counter() - t0, start))

    return update
