"""What `distft plan` prints: the per-rank table, the verdict against the given memory,
the cheapest change that fits, the one-line summary `distft train` shows, and the same
figures as JSON."""

from __future__ import annotations

from typing import Any

from distft.config import Config
from distft.config.loading import apply_overrides, from_dict
from distft.errors import UserError
from distft.plan import Plan, make_plan
from distft.plan.activations import calibration_note

GIB = 2**30


def gib(n: int) -> str:
    return f"{n / GIB:,.2f}"


# What each change costs a run, roughly in lost throughput: a smaller micro batch is
# nearly free, a ZeRO stage up is some communication (3: gathers in forward and backward),
# checkpointing recomputes the forward (~1/3 more compute), offload moves states over PCIe.
_COST = {
    "micro_batch_halved": 1,
    "checkpointing": 3,
    "stage": 1,
    "stage3": 3,
    "offload_opt": 6,
    "offload_param": 8,
}


def _changes(cfg: Config) -> list[list[str]]:
    """Every combination of micro batch (grad_accum raised to keep the global batch),
    checkpointing, ZeRO stage and offload that changes something, cheapest first."""
    ds, mb0 = cfg.deepspeed, cfg.batch.micro
    mbs = [mb0]
    while mbs[-1] > 1:
        mbs.append(mbs[-1] // 2)
    ckpts = [cfg.model.gradient_checkpointing, True]
    stages = list(range(ds.zero_stage, 4))
    opts = [ds.offload_optimizer, "cpu"]
    params = [ds.offload_param, "cpu"]
    ranked: list[tuple[int, list[str]]] = []
    for halvings, mb in enumerate(mbs):
        for ckpt in dict.fromkeys(ckpts):
            for stage in stages:
                for opt in dict.fromkeys(opts):
                    for param in dict.fromkeys(params):
                        changes, cost = [], halvings * _COST["micro_batch_halved"]
                        if mb != mb0:
                            ga = cfg.batch.grad_accum * mb0 // mb
                            changes += [f"batch.micro_batch_size={mb}", f"batch.grad_accum={ga}"]
                        if ckpt != cfg.model.gradient_checkpointing:
                            changes.append("model.gradient_checkpointing=true")
                            cost += _COST["checkpointing"]
                        if stage != ds.zero_stage:
                            changes.append(f"deepspeed.zero_stage={stage}")
                            cost += (stage - ds.zero_stage) * _COST["stage"]
                            cost += _COST["stage3"] if stage == 3 else 0
                        if opt != ds.offload_optimizer:
                            changes.append("deepspeed.offload_optimizer=cpu")
                            cost += _COST["offload_opt"]
                        if param != ds.offload_param:
                            changes.append("deepspeed.offload_param=cpu")
                            cost += _COST["offload_param"]
                        if changes:
                            ranked.append((cost, changes))
    ranked.sort(key=lambda item: item[0])  # stable: fewer halvings first at equal cost
    return [changes for _, changes in ranked]


def propose(plan: Plan, gpu: int | None, host: int | None) -> tuple[list[str], Plan] | None:
    """The cheapest change (overrides) whose plan fits, with that plan; None if nothing
    in the ladder fits."""
    for overrides in _changes(plan.cfg):
        try:
            changed = from_dict(apply_overrides(plan.cfg.model_dump(mode="json"), overrides))
        except UserError:  # a combination the config refuses
            continue
        candidate = make_plan(changed, plan.shape, world=plan.world)
        if candidate.fits(gpu, host):
            return overrides, candidate
    return None


def summary(plan: Plan, gpu: int | None = None) -> str:
    """One line: `plan: 35.21 GiB per GPU (model states 30.1, activations 3.2, loss 1.9),
    host 2.3 GiB per rank`."""
    a = plan.activations
    acts = a.layers + a.other + a.recompute
    loss = a.loss_held + a.loss_transient
    line = (
        f"plan: {gib(plan.device_total)} GiB per rank (model states and buffers "
        f"{gib(plan.device_total - acts - loss)}, activations {gib(acts)}, loss {gib(loss)}), "
        f"host {gib(plan.host_total)} GiB per rank"
    )
    if gpu is not None:
        line += f"; {'fits' if plan.device_total <= gpu else 'does not fit'} {gib(gpu)} GiB"
    return line


def _header(plan: Plan) -> str:
    c, s = plan.cfg, plan.shape
    ds = c.deepspeed
    offload = [
        k
        for k, v in (("optimizer", ds.offload_optimizer), ("params", ds.offload_param))
        if v == "cpu"
    ]
    return (
        f"{c.model.name_or_path}: {s.total / 1e9:.3f}B params, {s.trainable / 1e9:.3f}B trainable "
        f"({'LoRA' if c.lora.enabled else 'full'}); {plan.world} ranks, ZeRO-{ds.zero_stage}"
        f"{' offload ' + '+'.join(offload) if offload else ''}, {ds.precision.value}, "
        f"{plan.attention}, checkpointing {'on' if c.model.gradient_checkpointing else 'off'}, "
        f"{c.batch.micro} x {c.data.max_seq_len} tokens per micro-batch"
    )


def table(plan: Plan, gpu: int | None, host: int | None) -> list[str]:
    lines = [_header(plan), "", f"{'per rank':<44}{'GiB':>10}"]
    for where, rows in (("device", plan.device), ("host", plan.host)):
        for name, n in rows.items():
            lines.append(f"  {where:<7}{name:<37}{gib(n):>10}")
    lines.append(f"{'device total':<44}{gib(plan.device_total):>10}")
    lines.append(f"{'host total':<44}{gib(plan.host_total):>10}")
    if note := calibration_note(plan.shape.dims.model_type):
        lines.append(note)
    est = plan.ds_estimate
    ours_states = sum(v for k, v in plan.states.device.items() if "bucket" not in k)
    if est is not None:
        lines.append(
            f"DeepSpeed's estimate of model states (all params trained, 8 GPUs a node): device "
            f"{gib(est[1])} GiB per GPU, host {gib(est[0])} GiB per node; ours: device "
            f"{gib(ours_states)} GiB"
        )
    else:
        lines.append("DeepSpeed's estimate of model states: none for ZeRO 0/1")
    lines += verdict(plan, gpu, host)
    return lines


def verdict(plan: Plan, gpu: int | None, host: int | None) -> list[str]:
    if gpu is None and host is None:
        return []
    limits = ", ".join(
        f"{name} {gib(v)} GiB" for name, v in (("--gpu-memory", gpu), ("--host-memory", host)) if v
    )
    if plan.fits(gpu, host):
        return [f"fits: {limits}"]
    lines = [f"does not fit: {limits}"]
    found = propose(plan, gpu, host)
    if found is None:
        lines.append(
            "no change of micro batch, checkpointing, ZeRO stage or offload fits; "
            "more ranks (or sequence parallelism) would"
        )
    else:
        overrides, fixed = found
        lines.append(
            f"proposed: {' '.join(overrides)} -> device {gib(fixed.device_total)} GiB, "
            f"host {gib(fixed.host_total)} GiB per rank"
        )
    return lines


def as_json(plan: Plan, gpu: int | None, host: int | None) -> dict[str, Any]:
    p = plan.states.partition
    found = None if plan.fits(gpu, host) else propose(plan, gpu, host)
    return {
        "model": plan.cfg.model.name_or_path,
        "params": plan.shape.total,
        "trainable": plan.shape.trainable,
        "world": plan.world,
        "zero_stage": plan.cfg.deepspeed.zero_stage,
        "attention": plan.attention,
        "activations_calibrated": calibration_note(plan.shape.dims.model_type) is None,
        "micro_batch_size": plan.cfg.batch.micro,
        "partition_elements": {
            "weights": p.weights,
            "master": p.master,
            "moments": p.moments,
            "grads": p.grads,
        },
        "device_bytes": plan.device,
        "host_bytes": plan.host,
        "device_total_bytes": plan.device_total,
        "host_total_bytes": plan.host_total,
        "deepspeed_estimate_bytes": None
        if plan.ds_estimate is None
        else {"host": plan.ds_estimate[0], "device": plan.ds_estimate[1]},
        "gpu_memory_bytes": gpu,
        "host_memory_bytes": host,
        "fits": plan.fits(gpu, host),
        "proposal": None if found is None else found[0],
        "summary": summary(plan, gpu),
    }
