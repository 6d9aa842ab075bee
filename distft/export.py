"""Final model export from a live engine: full models as HF safetensors, LoRA as a PEFT
adapter. Under ZeRO-3 every parameter is gathered explicitly, one at a time, so rank 0
never saves the empty placeholders a plain `save_pretrained` would write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import deepspeed
import torch

from distft.dist import DistContext


def gathered_state_dict(module: torch.nn.Module, dist: DistContext, trainable_only: bool) -> dict:
    """Full tensors on rank 0 (CPU), an empty dict elsewhere. Collective under ZeRO-3."""
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        if hasattr(param, "ds_id"):  # ZeRO-3 partitioned: gather, copy on rank 0, release
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if dist.is_main:
                    out[name] = param.data.detach().cpu().clone()
        elif dist.is_main:
            out[name] = param.data.detach().cpu().clone()
    if not trainable_only and dist.is_main:
        for name, buf in module.named_buffers():
            out.setdefault(name, buf.detach().cpu().clone())
    return out


def save_final(engine: Any, tokenizer: Any, out_dir: Path, dist: DistContext, lora: bool) -> None:
    """Write `out_dir` as a loadable HF model (full) or PEFT adapter (LoRA)."""
    module = engine.module
    state = gathered_state_dict(module, dist, trainable_only=lora)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if lora:
            empty = [k for k, v in state.items() if v.numel() == 0]
            if empty or not state:
                raise RuntimeError(f"LoRA export gathered empty tensors: {empty[:3]}")
        module.save_pretrained(out_dir, state_dict=state)  # safetensors
        tokenizer.save_pretrained(out_dir)
    dist.barrier()
