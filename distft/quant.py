"""QLoRA: the 4-bit base (bitsandbytes) that `lora.quantize_base` asks for.

Everything but the choice of format is derived, so one key says it all:

- compute dtype: the training dtype (`deepspeed.precision`, or `model.dtype` when set);
  the 4-bit weights are dequantised to it for each matmul.
- double quantisation: always on (the per-block scales are themselves quantised to 8 bit:
  about 0.37 bits per parameter saved, QLoRA paper section 3).
- quant storage: the training dtype. Under ZeRO-3 this is required: DeepSpeed partitions
  and gathers the packed weights as ordinary tensors of the training dtype (peft docs,
  "DeepSpeed", "ZeRO-3 and QLoRA": `bnb_4bit_quant_storage` = the `torch_dtype`). Other
  stages use the same layout: the same bytes as bitsandbytes' default uint8, and
  DeepSpeed's casts of the module to its dtype leave it alone.

Only the linear layers inside the model are quantised (transformers keeps the output head
and embeddings in the training dtype); LoRA adapters train on top in the training dtype.
`quantized_bytes` is what the planner counts for those layers.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # config validation imports this module: keep it light
    import torch

    from distft.config import Config

BLOCK = 64  # weights per absmax scale (bitsandbytes' 4-bit blocksize)
NESTED_BLOCK = 256  # scales per fp32 second-level scale under double quantisation


def bytes_per_param(double_quant: bool = True, blocksize: int = BLOCK) -> float:
    """Bytes one quantised base weight takes, its quant state included: 4 bits of data, plus
    per block of `blocksize` weights one scale: an fp32 absmax (4 bytes), or with double
    quantisation an 8-bit code (1 byte) and one fp32 scale per 256 of those codes. The
    per-tensor extras (the 16-value code book, one offset) are ignored (< 100 bytes).
    nf4, double quant, blocks of 64: 0.5 + 1/64 + 4/(64*256) = 0.515869... bytes."""
    scale = 1 + 4 / NESTED_BLOCK if double_quant else 4.0
    return 0.5 + scale / blocksize


def quantized_bytes(n_params: int, double_quant: bool = True) -> int:
    """Memory of `n_params` base weights held in 4 bits (see `bytes_per_param`), rounded up."""
    return int(-(-n_params * bytes_per_param(double_quant) // 1))


def missing_package() -> str | None:
    """One line when bitsandbytes is not installed, else None."""
    if importlib.util.find_spec("bitsandbytes") is not None:
        return None
    return (
        "lora.quantize_base: needs the bitsandbytes package "
        "(pip install 'distft[qlora]', or pip install bitsandbytes)"
    )


def bnb_config(cfg: Config, dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for this run (`dtype`: the training dtype), or None
    when the base is not quantised."""
    kind = cfg.lora.quantize_base
    if kind is None:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def skip_quant_state_on_load(model: torch.nn.Module) -> None:
    """A checkpoint of a 4-bit run holds, beside each packed weight, its quant state as
    extra entries (`...weight.absmax`, `...weight.quant_state.bitsandbytes__nf4`, ...),
    which `load_state_dict` would refuse as unexpected keys on resume. They describe the
    frozen base, which every start rebuilds identically (the same weights, the same
    deterministic quantisation), so loading drops them; every other key stays strict."""

    def drop(module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for key in [k for k in state_dict if _is_quant_state(k)]:
            del state_dict[key]

    model.register_load_state_dict_pre_hook(drop)


def keep_packed_layout(model: torch.nn.Module) -> None:
    """bitsandbytes (0.50) on a CPU with AVX512-BF16 repacks a 4-bit weight in place for
    its CPU kernel at the first forward in eval mode without gradients (evaluation, the
    export checks), and converts it back only when a state dict is taken. Under DeepSpeed
    the weight's storage is ZeRO's (cast, partitioned, gathered for the forward), and the
    repacked layout breaks the next checkpoint save (an assertion in bitsandbytes'
    inverse) and makes the trained base's bytes depend on the CPU. Off: every machine
    keeps the layout it quantised, and computes with the kernels every CPU has."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010


def _is_quant_state(key: str) -> bool:
    weight, _, rest = key.rpartition(".weight.")
    return bool(weight) and (rest in _STATE_SUFFIXES or rest.startswith("quant_state."))
