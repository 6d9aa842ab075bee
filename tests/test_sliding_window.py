"""Packed batches for models with sliding-window attention (fp32, CPU): a packed step's
loss and gradients equal those of its samples one at a time, for samples longer than the
window, on every layer type (Mistral: all layers windowed; Gemma-2 and Gemma-3: sliding and
full layers alternate), with sdpa and eager; Llama (no window) keeps its 4-D mask. The
loader reads the windows from the model's config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers as hf

from distft.config import Config, from_dict
from distft.data import DataError, Split, TrainBatches, collate_rows
from distft.data.loader import Batch, has_short_windows
from distft.dist import DistContext
from distft.objectives import nll_sum
from distft.tolerance import Kind, assert_close, within

WINDOW = 16
MAX_SEQ_LEN = 64
SMALL = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    head_dim=8,
)
FAMILIES: dict[str, Callable[[], Any]] = {
    "llama": lambda: hf.LlamaConfig(**SMALL),
    "mistral": lambda: hf.MistralConfig(**SMALL, sliding_window=WINDOW),
    "phi3": lambda: hf.Phi3Config(**SMALL, sliding_window=WINDOW, pad_token_id=0),
    "gemma2": lambda: hf.Gemma2Config(**SMALL, sliding_window=WINDOW),  # sliding, full
    "gemma3": lambda: hf.Gemma3TextConfig(
        **SMALL, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]
    ),
}
# Gemma-2 has no sdpa path in transformers (attention logit softcapping): eager only.
CASES = [
    (family, attn)
    for family in FAMILIES
    for attn in ("sdpa", "eager")
    if (family, attn) != ("gemma2", "sdpa")
]


def make_cfg(model_dir: Path | str, attn: str, micro: int = 2, accum: int = 2) -> Config:
    return from_dict(
        {
            "seed": 3,
            "model": {"name_or_path": str(model_dir), "attn_implementation": attn},
            "data": {"train_files": ["unused"], "batching": "packed", "max_seq_len": MAX_SEQ_LEN},
            "batch": {"micro_batch_size": micro, "grad_accum": accum},
            "checkpoint": {"output_dir": "unused"},
        }
    )


def ctx(rank: int = 0, world: int = 1) -> DistContext:
    return DistContext(rank, world, rank, torch.device("cpu"))


@pytest.fixture(scope="module")
def split() -> Split:
    """Samples from 5 to 60 tokens: most are longer than the window of 16."""
    rng = np.random.default_rng(0)
    ids, labels = [], []
    for n in rng.integers(5, 61, size=24).tolist():
        tokens = rng.integers(3, 96, size=n).tolist()
        ids.append(tokens)
        labels.append([-100] * (n // 3) + tokens[n // 3 :])  # a prompt, then targets
    return Split.from_lists(ids, labels)


def saved_config(family: str, root: Path) -> Path:
    out = root / family
    FAMILIES[family]().save_pretrained(out)
    return out


def build_model(family: str, attn: str) -> Any:
    torch.manual_seed(0)
    config = FAMILIES[family]()  # use_cache stays on: the batch must turn it off itself
    model = hf.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.float().train()


def step(model: Any, micro_batches: list[Batch]) -> tuple[float, torch.Tensor]:
    """The loop's objective for one optimizer step: (1/T) * sum of summed token NLLs."""
    model.zero_grad(set_to_none=True)
    total = sum(b.n_targets for b in micro_batches)
    loss = 0.0
    for b in micro_batches:
        s = nll_sum(model, b)
        (s / total).backward()
        loss += s.item() / total
    return loss, torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize(("family", "attn"), CASES)
def test_packed_step_equals_its_samples_one_at_a_time(
    family: str, attn: str, split: Split, tmp_path: Path
) -> None:
    cfg = make_cfg(saved_config(family, tmp_path), attn)
    batches = TrainBatches(split, cfg, ctx(), pad_id=0)  # reads the windows from the config
    windowed = family != "llama"
    assert batches.windowed is windowed
    micro = batches.for_step(0)
    rows = [row for rows in batches.indices_for_step(0) for row in rows]
    samples = [int(i) for row in rows for i in row]
    assert any(len(row) > 1 for row in rows)  # really packed
    assert (split.lengths[samples] > WINDOW).sum() >= 3  # longer than the window
    for b in micro:
        assert b.position_ids is not None
        assert b.attention_mask is None  # a 4-D mask is built where the batch runs, if any
        assert (b.mask is None) is windowed  # none: transformers builds each layer's
        assert b.model_inputs()["use_cache"] is False
    one_by_one = [collate_rows([[split.sample(i)]], 0, attn) for i in samples]
    assert sum(b.n_targets for b in micro) == sum(b.n_targets for b in one_by_one)

    model = build_model(family, attn)
    loss, grads = step(model, micro)
    ref_loss, ref_grads = step(model, one_by_one)
    # Exact in real arithmetic; in fp32 the packed and single rows reduce their sums in
    # other orders (other matmul shapes, so other blockings): the budget of reassociated
    # fp32 results in ulps of the largest magnitude (distft.tolerance). Measured here: 0.5
    # ulp of the loss, 3 ulps of the largest gradient.
    assert_close(loss, ref_loss, torch.float32, Kind.REASSOCIATED, "packed loss")
    assert_close(grads, ref_grads, torch.float32, Kind.REASSOCIATED, "packed gradients")
    assert ref_grads.abs().max().item() > 1e-3  # the comparison is not between zeros
    if windowed:  # control: the block-diagonal 4-D mask alone (no window band) is wrong
        masked = [
            collate_rows([[split.sample(int(i)) for i in row] for row in rows_], 0, attn)
            for rows_ in batches.indices_for_step(0)
        ]
        assert all(b.mask is not None for b in masked)
        wrong, wrong_grads = step(model, masked)
        assert not within(wrong_grads, ref_grads, torch.float32, Kind.REASSOCIATED)[0]
        assert abs(wrong - ref_loss) > 100 * abs(loss - ref_loss)  # measured: 1000x or more


def test_windows_as_long_as_a_pack_keep_the_fast_mask(tmp_path: Path) -> None:
    """A window of at least `max_seq_len` never cuts a packed sample's prefix (a query at i
    sees keys i-w+1 .. i), so such models keep the numpy mask; so do models without one."""
    mistral = saved_config("mistral", tmp_path)
    assert has_short_windows(make_cfg(mistral, "sdpa").model, MAX_SEQ_LEN)
    assert has_short_windows(make_cfg(mistral, "sdpa").model, WINDOW + 1)
    assert not has_short_windows(make_cfg(mistral, "sdpa").model, WINDOW)
    assert not has_short_windows(make_cfg(saved_config("llama", tmp_path), "sdpa").model, 4096)
    assert has_short_windows(make_cfg(saved_config("gemma3", tmp_path), "eager").model, 64)


def test_the_config_is_read_only_when_packed_rows_need_it(split: Split) -> None:
    flash = TrainBatches(split, make_cfg("no/such/model", "flash_attention_2"), ctx(), 0)
    assert flash.windowed is False  # flash-attention applies each layer's window itself
    padded = make_cfg("no/such/model", "sdpa")
    padded.data.batching = "padded"
    assert TrainBatches(split, padded, ctx(), 0).windowed is False
    missing = TrainBatches(split, make_cfg("no/such/model", "sdpa"), ctx(), 0)
    with pytest.raises(DataError, match="^model.name_or_path: packed batches need the model"):
        missing.for_step(0)
