"""Checks that span config sections and belong to one feature each: sequence parallelism
(distft.seqpar) and the LoRA variants (DoRA, rsLoRA, the 4-bit base of distft.quant).
`Config`'s validator calls them; each returns its problems, one line each."""

from __future__ import annotations

from typing import TYPE_CHECKING

from distft.quant import missing_package as _missing_bnb

if TYPE_CHECKING:
    from distft.config.sections import Config


def sequence_parallel_problems(self: Config) -> list[str]:
    """Ulysses attention (distft.seqpar) discards attention masks and rebuilds causal
    attention from position ids over the whole sequence: it needs a kernel that masks
    causally by itself (not eager), and packed rows only with flash_attention_2 (the
    varlen kernel separates samples by their position ids; SDPA would let them see
    each other). Its shapes are fixed per micro-batch row count, which length-grouped
    batches vary."""
    sp, key = self.deepspeed.sequence_parallel_size, "deepspeed.sequence_parallel_size"
    if sp == 1:
        return []
    out = []
    if self.cluster.num_workers % sp:
        out.append(f"{key}: {sp} must divide cluster.num_workers ({self.cluster.num_workers})")
    attn, batching = self.model.attn_implementation, self.data.batching
    if attn == "eager":
        out.append(f"{key}: {sp} needs model.attn_implementation sdpa or flash_attention_2")
    if batching == "length_grouped":
        out.append(f"{key}: {sp} needs data.batching padded, packed or auto")
    elif batching == "packed" and attn != "flash_attention_2":
        out.append(
            f"{key}: {sp} with data.batching packed needs model.attn_implementation "
            f"flash_attention_2 (got {attn}); use data.batching padded"
        )
    return out


def adapter_problems(self: Config) -> list[str]:
    """DoRA, rsLoRA and the 4-bit base: each needs LoRA; the 4-bit base needs
    bitsandbytes and keeps its weights on the worker (no ZeRO-3 parameter offload)."""
    lora, ds, problems = self.lora, self.deepspeed, []
    for key, on in (("use_dora", lora.use_dora), ("use_rslora", lora.use_rslora)):
        if on and not lora.enabled:
            problems.append(f"lora.{key}: needs lora.enabled: true")
    if lora.quantize_base is None:
        return problems
    if not lora.enabled:
        problems.append(
            "lora.quantize_base: needs lora.enabled: true (a full fine-tune trains the "
            "base weights, which stay frozen in 4 bits)"
        )
    if ds.offload_param == "cpu":
        problems.append(
            "lora.quantize_base: not with deepspeed.offload_param: 'cpu' (bitsandbytes' "
            "packed weights and their quant state must stay on the worker's device); "
            "a 4-bit base is already small: use offload_param: none"
        )
    if self.model.dtype not in ("auto", ds.precision.value):
        problems.append(
            f"lora.quantize_base: model.dtype {self.model.dtype} differs from "
            f"deepspeed.precision {ds.precision.value}; the packed 4-bit weights are "
            "stored in the training dtype, which DeepSpeed's cast would corrupt "
            "(set model.dtype: auto)"
        )
    if lora.use_dora and not self.cluster.use_gpu:
        problems.append(
            "lora.use_dora: not with lora.quantize_base on CPU workers (peft's DoRA "
            "replaces the packed 4-bit weight on CPU at every forward, which DeepSpeed "
            "then no longer finds); use a GPU, or a base in the training dtype"
        )
    if missing := _missing_bnb():
        problems.append(missing)
    return problems
