"""Does an export compute the function that was trained? Logits on fixed probe inputs.

The exported folder is loaded the way a user loads it (plain `transformers` / `peft`),
its logits are computed, and the same model object is then overwritten, tensor by tensor
and by name, with the reference weights: DeepSpeed's own `zero_to_fp32` reading of the
checkpoint (an implementation independent of `distft.export.consolidate`), or the live engine's
logits at the end of training. A weight that was dropped, renamed, mis-sliced, cast wrongly
or re-initialised on load shows up as a logit difference far above the tolerance.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from distft.tolerance import Kind, bound

_PROBE_CONVERSATION = [
    {"role": "user", "content": "Reverse the order of these words: cat dog sun"},
    {"role": "assistant", "content": "sun dog cat"},
]


class VerificationFailed(Exception):
    """The export does not compute what the checkpoint computes: a bug, not bad input."""


def probe_inputs(
    tokenizer: Any, vocab_size: int, max_positions: int, extra_ids: list[int] | None = None
) -> list[torch.Tensor]:
    """Fixed inputs, identical on every rank and in every process: one conversation
    rendered with the chat template, then seeded random token ids of a few lengths, and
    with `extra_ids` (added tokens) a row of the conversation's start followed by them."""
    text = tokenizer.apply_chat_template(_PROBE_CONVERSATION, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_positions]
    gen = torch.Generator().manual_seed(0)
    rows = [torch.tensor([ids], dtype=torch.long)]
    for length in (7, 33, 64):
        n = min(length, max_positions)
        rows.append(torch.randint(0, vocab_size, (1, n), generator=gen))
    if extra_ids:
        row = (ids[:8] + list(extra_ids) * 2)[:max_positions]
        rows.append(torch.tensor([row], dtype=torch.long))
    return rows


@torch.no_grad()
def logits(model: Any, inputs: list[torch.Tensor], device: torch.device | None = None) -> list:
    """Float32 CPU logits of each probe row, in eval mode (no dropout); one row at a time,
    so no padding is involved. Collective under ZeRO-3 when `model` is an engine."""
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    try:
        dev = device or next(module.parameters()).device
        return [model(input_ids=x.to(dev)).logits.float().cpu() for x in inputs]
    finally:
        module.train(was_training)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def check(
    what: str, got: list[torch.Tensor], want: list[torch.Tensor], dtype: torch.dtype, kind: Kind
) -> str:
    """'max |Δ| D (bound B)' for the logits; VerificationFailed above what rounding
    explains for `kind` in `dtype` at the logits' magnitude (`distft.tolerance`)."""
    diff, tol = max_diff(got, want), bound(want, dtype, kind)
    if not diff <= tol:  # also catches NaN
        raise VerificationFailed(
            f"{what}: logits differ by {diff:.3g} (tolerance {tol:.3g}: {kind.value} in {dtype})"
        )
    return f"max |Δ| {diff:.2e} (bound {tol:.2e})"


def check_changes(got: list[torch.Tensor], base: list[torch.Tensor], dtype: torch.dtype) -> float:
    """A LoRA adapter must change the outputs of its base model by more than rounding."""
    diff = max_diff(got, base)
    if not diff > bound(base, dtype, Kind.RECOMPUTED):
        raise VerificationFailed(
            f"the adapter does not change the base model's logits (max |Δ| {diff:.3g})"
        )
    return diff


def load_weights(
    model: torch.nn.Module, tensors: Mapping[str, Any], dtype: torch.dtype, required: list[str]
) -> None:
    """Overwrite `model`'s parameters and buffers by name with `tensors` (rounded through
    `dtype`, as the export was). Every name in `required` must be covered."""
    own = model.state_dict(keep_vars=True)
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise VerificationFailed(f"checkpoint tensor {unknown[0]} has no place in the model")
    with torch.no_grad():
        for name, lazy in tensors.items():
            t = lazy.contiguous() if not isinstance(lazy, torch.Tensor) else lazy
            target = own[name]
            if t.is_floating_point():
                t = t.to(dtype)
            target.copy_(t.to(target.dtype))
    missing = [n for n in required if n not in tensors]
    if missing:
        raise VerificationFailed(f"the checkpoint has no value for {missing[0]}")


def deepspeed_reference(ckpt: Path, trainable_only: bool) -> Mapping[str, Any]:
    """The checkpoint's weights as DeepSpeed's `zero_to_fp32` reads them (lazily where
    it can: ZeRO-3 tensors are gathered when used)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from distft.export.consolidate import check_pickles

    check_pickles(ckpt)  # DeepSpeed's reader unpickles without restrictions
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(
            str(ckpt.parent),
            tag=ckpt.name,
            exclude_frozen_parameters=trainable_only,
            lazy_mode=True,
        )


def check_adapter_file(path: Path, expected: int) -> None:
    """Non-empty: every trained tensor present with data, and some lora_B not zero
    (a LoRA adapter with all-zero B is the identity)."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    empty = [k for k, v in tensors.items() if v.numel() == 0]
    if len(tensors) != expected or empty:
        raise VerificationFailed(
            f"{path}: {len(tensors)} tensors ({len(empty)} empty), the checkpoint trained "
            f"{expected}"
        )
    if not any("lora_B" in k and bool(v.abs().sum() > 0) for k, v in tensors.items()):
        raise VerificationFailed(f"{path}: every lora_B is zero (the adapter is the identity)")
