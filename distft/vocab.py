"""Added special tokens: the tokenizer gains them, the model's embeddings grow to hold them.

`model.add_special_tokens` are added to the tokenizer as special tokens (never split,
dropped by `decode(skip_special_tokens=True)`); `model.pad_token` sets the padding token,
adding it when the vocabulary lacks it. When the tokenizer then has more tokens than the
model has embedding rows, the input embeddings and an untied output head are resized
(transformers' `resize_token_embeddings`, which gathers ZeRO-3 partitions itself), to a
multiple of `model.pad_vocab_to_multiple_of` when set, and every new row starts as the
mean of the existing rows (deterministic, the same on every rank; the common choice, and
a new token's logit then starts near the average one instead of dominating).

Under LoRA the base is frozen, so the configured tokens' rows are trained through peft's
`trainable_token_indices` (`trainable_tokens`): peft keeps a trained copy of just those
rows (for the input embeddings and an untied head) and saves them with the adapter, a few
KB instead of the whole embedding matrix that `modules_to_save` would store. A module
listed in `lora.modules_to_save` is trained whole instead and gets no token rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from distft.config import Config


def load_tokenizer(cfg: Config) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        cfg.model.tokenizer or cfg.model.name_or_path,
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
    )
    add_tokens(tok, cfg)  # model.add_special_tokens, model.pad_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # A missing chat template is the data layer's concern (data.chat_template names a
    # built-in one; text and pre-tokenized formats need none).
    return tok


def customised(cfg: Config) -> bool:
    """Whether the run changes the tokenizer's vocabulary or padding token."""
    return bool(cfg.model.add_special_tokens) or cfg.model.pad_token is not None


def add_tokens(tokenizer: Any, cfg: Config) -> Any:
    """`tokenizer` with the run's special tokens and padding token (in place)."""
    m = cfg.model
    if m.add_special_tokens:
        tokenizer.add_tokens(list(m.add_special_tokens), special_tokens=True)
    if m.pad_token is not None:
        if m.pad_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([m.pad_token], special_tokens=True)
        tokenizer.pad_token = m.pad_token
    return tokenizer


def embedding_rows(cfg: Config, n_tokens: int, rows: int) -> int:
    """The embedding rows a model with `rows` needs for a tokenizer of `n_tokens`: unchanged
    when they fit (many models ship spare rows), else `n_tokens` rounded up to
    `model.pad_vocab_to_multiple_of`."""
    if n_tokens <= rows:
        return rows
    multiple = cfg.model.pad_vocab_to_multiple_of or 1
    return math.ceil(n_tokens / multiple) * multiple


def resize(model: Any, cfg: Config, tokenizer: Any) -> int:
    """Grow `model`'s embeddings (and an untied head) for `tokenizer`; new rows are the mean
    of the old ones. Returns how many rows were added. Call it while transformers sees the
    ZeRO-3 config (`HfDeepSpeedConfig` alive), so the resize gathers the partitions; the
    resized weights are whole tensors until `deepspeed.initialize` partitions them."""
    emb = model.get_input_embeddings()
    old = int(getattr(emb.weight, "ds_shape", emb.weight.shape)[0])
    new = embedding_rows(cfg, len(tokenizer), old)
    if new == old:
        return 0
    model.resize_token_embeddings(new, mean_resizing=False)  # random rows, replaced below
    head = model.get_output_embeddings()
    layers = [model.get_input_embeddings()]
    if head is not None and head.weight is not layers[0].weight:
        layers.append(head)
    for layer in layers:
        _mean_init(layer.weight, old)
    return new - old


@torch.no_grad()
def _mean_init(weight: torch.Tensor, old: int) -> None:
    """Rows `old:` of `weight` := the mean of rows `:old` (in fp32, then the weight's
    dtype). A ZeRO-3 partition is gathered and written back from rank 0."""
    if weight.is_meta:
        return
    if hasattr(weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
            _mean_init(weight.data, old)
        return
    weight[old:] = weight[:old].float().mean(dim=0).to(weight.dtype)


def token_ids(cfg: Config, tokenizer: Any) -> list[int]:
    """The ids of `model.add_special_tokens`, the rows LoRA trains."""
    return [int(tokenizer.convert_tokens_to_ids(t)) for t in cfg.model.add_special_tokens]


def trainable_tokens(model: Any, cfg: Config, ids: list[int]) -> dict[str, list[int]] | None:
    """peft's `trainable_token_indices`: the input embeddings' module name -> `ids`, and the
    untied output head's too (its rows of the new tokens are new as well); a module in
    `lora.modules_to_save` is left out (trained whole). None when there is nothing to
    train. A tied head follows the embeddings (peft ties the trained rows)."""
    if not ids:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    layers = [emb]
    if head is not None and head.weight is not emb.weight:
        layers.append(head)
    saved = cfg.lora.modules_to_save
    out = {}
    for layer in layers:
        name = names[id(layer)]
        if not any(name == s or name.endswith(f".{s}") for s in saved):
            out[name] = list(ids)
    return out or None


@contextmanager
def gathered(model: Any, active: bool) -> Iterator[None]:
    """While active, ZeRO-3 partitioned embedding/head weights are whole on every rank
    (read-only): peft's trainable tokens copy their rows at creation, and its own ZeRO-3
    path for that assumes CUDA."""
    weights = [
        m.weight
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        if m is not None and hasattr(m.weight, "ds_id")
    ]
    if not (active and weights):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(weights, modifier_rank=None):
        yield
