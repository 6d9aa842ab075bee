"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"):
uniform noise on the input embeddings while training, none in eval or export.

    noise ~ U(-1, 1) * alpha / sqrt(L * d)

for a sequence of L tokens and hidden size d. transformers' `neftune_post_forward_hook`
(trainer_utils.py) takes L as the batch's padded width; distft packs several samples
into a row, so L here is each token's own sample length: a packed row restarts its
`position_ids` at 0 for every sample (its padding is one more block), and a token's L is
the size of its block. Without position ids (not a packed batch) L is the row's width,
as in transformers.

The noise is drawn from torch's default generator of the embeddings' device, whose state
every checkpoint saves and restores (`distft.checkpoint.rng_state`), so a resumed run
draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.hooks import RemovableHandle


def sample_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """(rows, width) -> for every token, the length of the sample it belongs to (a block
    of positions starting at 0)."""
    starts = position_ids == 0
    starts[:, 0] = True
    block = starts.long().cumsum(dim=1)  # 1-based block number within the row
    sizes = torch.zeros(
        (block.size(0), block.size(1) + 1), dtype=torch.long, device=block.device
    ).scatter_add_(1, block, torch.ones_like(block))
    return sizes.gather(1, block)


def noise_scale(alpha: float, lengths: torch.Tensor, hidden: int) -> torch.Tensor:
    """alpha / sqrt(L * d) per token, as (rows, width, 1) in fp32."""
    return (alpha / torch.sqrt(lengths.float() * hidden)).unsqueeze(-1)


def attach(model: torch.nn.Module, alpha: float) -> list[RemovableHandle]:
    """Add NEFTune noise to the output of `model.get_input_embeddings()` in training mode.
    `model` is the module the engine calls (a PEFT model included): a pre-hook there reads
    the batch's `position_ids`; attach after any wrapping of the embeddings (peft's
    trainable tokens replace their forward)."""
    seen: dict[str, torch.Tensor | None] = {}

    def remember(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["position_ids"] = kwargs.get("position_ids")

    def add_noise(module: torch.nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        pos = seen.get("position_ids")
        if pos is not None and pos.shape == output.shape[:2]:
            lengths = sample_lengths(pos)
        else:  # L = the padded width (transformers' choice)
            lengths = torch.full(output.shape[:2], output.size(1), device=output.device)
        scale = noise_scale(alpha, lengths, output.size(-1)).to(output.device, output.dtype)
        return output + torch.zeros_like(output).uniform_(-1, 1) * scale

    get = model.get_input_embeddings
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, torch.nn.Module):
        raise ValueError(f"{type(model).__name__} has no input embeddings for NEFTune")
    return [
        model.register_forward_pre_hook(remember, with_kwargs=True),
        embeddings.register_forward_hook(add_noise),
    ]
