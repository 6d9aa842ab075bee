"""The memory planner (`distft plan`): per-rank device and host memory of a run from its
config and the model's shape (built on the meta device, no weights read). A pure
function of the config, the model's config.json and DeepSpeed's config
(`engine.build_ds_config`, the one training uses)."""

from __future__ import annotations

from dataclasses import dataclass

from distft.config import Config, Precision
from distft.plan.activations import Activations, activations, materialised_mask
from distft.plan.shape import ModelShape, model_shape
from distft.plan.states import States, deepspeed_estimate, states

__all__ = ["Plan", "make_plan", "ModelShape", "model_shape"]


@dataclass(frozen=True)
class Plan:
    cfg: Config
    shape: ModelShape
    world: int
    attention: str
    states: States
    activations: Activations
    ds_estimate: tuple[int, int] | None  # DeepSpeed's (host, device) bytes for model states

    @property
    def device(self) -> dict[str, int]:
        a = self.activations
        rows = dict(self.states.device)
        rows["activations (held for backward)"] = a.layers + a.other
        if a.recompute:
            rows["activations (recomputed layer)"] = a.recompute
        rows["loss buffers (logits)"] = a.loss_held + a.loss_transient
        return rows

    @property
    def host(self) -> dict[str, int]:
        return dict(self.states.host)

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    def fits(self, gpu: int | None, host: int | None) -> bool:
        return (gpu is None or self.device_total <= gpu) and (
            host is None or self.host_total <= host
        )


# the weights a rank holds between steps (ZeRO-3's gathered layer is transient, and the
# reference's forward never runs beside the policy's)
_HELD_WEIGHTS = ("weights", "weights (partition)", "weights (persistent small params)")


def with_reference(s: States, cfg: Config) -> States:
    """DPO with `dpo.reference: resident` and full fine-tuning keeps a frozen copy of the
    weights (`distft.objectives.reference`): as many bytes as the trained weights (under
    ZeRO-3 its own partition, with or without parameter offload). Under LoRA the reference
    is the base with the adapters off (nothing more); precomputed, nothing at all."""
    o = cfg.objective
    if o.method != "dpo" or o.dpo.reference != "resident" or cfg.lora.enabled:
        return s
    for rows in (s.device, s.host):
        weights = sum(v for k, v in rows.items() if k in _HELD_WEIGHTS)
        if weights:
            rows["DPO reference (resident frozen copy)"] = weights
    return s


def resolved_attention(cfg: Config) -> str:
    """The attention the run would use, without importing flash-attn: `auto` is
    flash_attention_2 on GPU workers in 16 bits, else sdpa (both keep no n x n matrix)."""
    attn = cfg.model.attn_implementation
    if attn != "auto":
        return attn
    gpu16 = cfg.cluster.use_gpu and cfg.deepspeed.precision != Precision.fp32
    return "flash_attention_2" if gpu16 else "sdpa"


def make_plan(
    cfg: Config,
    shape: ModelShape | None = None,
    *,
    sequence_parallel: int | None = None,
    loss_chunk_size: int | None = None,
    world: int | None = None,
    quant_bits: int | None = None,
) -> Plan:
    """The plan of `cfg` on `world` ranks (default cluster.num_workers). `shape`: the
    model's (built from the config when None). `sequence_parallel` and `loss_chunk_size`
    and `quant_bits` (QLoRA's quantised base weights) are the planner's side of keys other
    parts of distft add."""
    from distft.engine import build_ds_config
    from distft.model import hf_config

    world = world or cfg.cluster.num_workers
    shape = shape or model_shape(cfg)
    # Ulysses: each rank holds 1/SP of every sequence's activations; ZeRO still partitions
    # the model states over all ranks (DeepSpeed's sequence-data-parallel group).
    sequence_parallel = sequence_parallel or cfg.deepspeed.sequence_parallel_size
    quant_bits = quant_bits or (4 if cfg.lora.quantize_base else None)  # nf4 / fp4
    loss_chunk_size = loss_chunk_size or cfg.model.loss_chunk_size or None
    ds, _ = build_ds_config(cfg, max(1, world // sequence_parallel))
    attention = resolved_attention(cfg)
    e = 4 if cfg.deepspeed.precision == Precision.fp32 else 2
    try:
        packed = cfg.data.batching == "packed"
        masked = materialised_mask(hf_config(cfg, local_only=True), attention, packed)
    except (OSError, ValueError):
        masked = False
    acts = activations(
        shape.dims,
        e=e,
        attention=attention,
        seq=cfg.data.max_seq_len,
        micro_batch=cfg.batch.micro,
        checkpointing=cfg.model.gradient_checkpointing,
        loss_chunk_size=loss_chunk_size,
        head_trains=not cfg.lora.enabled,
        sequence_parallel=sequence_parallel,
        masked=masked,
    )
    return Plan(
        cfg,
        shape,
        world,
        attention,
        with_reference(states(shape, ds, world, quant_bits, gpu=cfg.cluster.use_gpu), cfg),
        acts,
        deepspeed_estimate(shape, ds, world),
    )
