"""The reward model's Bradley-Terry loss against the formula, computed here from plain
Hugging Face `LlamaForSequenceClassification` forwards of each sequence alone (fp32,
transformers' own pooling at the last non-pad token): loss and gradients, for padded and
packed batches, with and without the centring term. Fillers count for nothing."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from distft.archs import FAMILIES, family_config
from distft.config import RewardConfig
from distft.data import IGNORE
from distft.data.loader import collate_units
from distft.objectives.reward import Reward, last_positions
from distft.tolerance import Kind, assert_close
from tests.test_preference import VOCAB, make_pairs, pair_split

PAD = 0  # make_pairs draws ids from 1..VOCAB-1: no pad inside a sequence


def reward_model(seed: int) -> Any:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="sdpa", num_labels=1, pad_token_id=PAD,
    )  # fmt: skip
    return LlamaForSequenceClassification(cfg).float()


def plain_reward(model: Any, ids: list[int]) -> torch.Tensor:
    """What a user's plain transformers call returns for one sequence."""
    return model(torch.tensor([ids])).logits[0, 0].float()


@pytest.mark.parametrize("center", [0.0, 0.05], ids=["bt", "centred"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_loss_and_gradients_equal_bradley_terry(packed: bool, center: float) -> None:
    model = reward_model(0)
    rows = make_pairs(3, seed=1)
    split = pair_split(rows)
    units = [np.array([0, 1, 2])] if packed else [np.array([k]) for k in range(3)]
    batch = collate_units(split, units, pad_id=PAD, attn="sdpa", windowed=False)
    assert (batch.position_ids is not None) == packed and batch.n_seqs == 6

    out = Reward(RewardConfig(center_coefficient=center), PAD)(model, batch)
    ours = torch.autograd.grad(out.total, list(model.parameters()))
    r = [plain_reward(model, ids) for ids, _ in rows]
    want = torch.zeros(())
    for rc, rr in zip(r[0::2], r[1::2], strict=True):
        want = want - torch.log(torch.sigmoid(rc - rr)) + center * (rc + rr) ** 2
    theirs = torch.autograd.grad(want, list(model.parameters()))

    # the same fp32 sums through other kernels (one row per sequence vs the batch's rows,
    # SDPA with or without a block mask)
    assert_close(out.total.detach(), want.detach(), torch.float32, Kind.REASSOCIATED, "loss")
    for a, b, (name, _) in zip(ours, theirs, model.named_parameters(), strict=True):
        assert_close(a, b, torch.float32, Kind.REASSOCIATED, f"grad {name}")
    assert int(out.units) == 3
    r = [x.detach() for x in r]
    margins = sum(float(rc - rr) for rc, rr in zip(r[0::2], r[1::2], strict=True))
    assert_close(
        out.sums["rewards/margins"], torch.tensor(margins), torch.float32, Kind.REASSOCIATED
    )
    wins = sum(float(rc > rr) for rc, rr in zip(r[0::2], r[1::2], strict=True))
    assert float(out.sums["rewards/accuracy"]) == wins


def test_a_sequence_is_scored_at_its_last_non_pad_token() -> None:
    """transformers' rule: a trailing pad token inside the sequence (pad = eos in many
    tokenizers) is skipped, as transformers skips it when it scores the sequence alone."""
    model = reward_model(0)
    rows = [([5, 6, 7, 8, PAD], [IGNORE, IGNORE, 7, 8, PAD]), ([5, 6, 9], [IGNORE, IGNORE, 9])]
    batch = collate_units(pair_split(rows), [np.array([0])], PAD, "sdpa", False)
    assert last_positions(batch, PAD).tolist() == [3, batch.input_ids.shape[1] + 2]
    with torch.no_grad():
        out = Reward(RewardConfig(), PAD)(model, batch)
        r = [plain_reward(model, ids) for ids, _ in rows]
    assert_close(out.sums["rewards/chosen"], r[0], torch.float32, Kind.REASSOCIATED)
    assert_close(out.sums["rewards/rejected"], r[1], torch.float32, Kind.REASSOCIATED)


def test_filler_pairs_count_for_nothing() -> None:
    model = reward_model(0)
    rows = make_pairs(2)
    filler = ([5, 6], [IGNORE, IGNORE])
    one = collate_units(pair_split(rows[:2]), [np.array([0])], PAD, "sdpa", False)
    with_filler = collate_units(
        pair_split(rows[:2] + [filler, filler]), [np.array([0]), np.array([1])], PAD, "sdpa", False
    )
    objective = Reward(RewardConfig(), PAD)
    a, b = objective(model, one), objective(model, with_filler)
    assert int(b.units) == 1 and math.isfinite(float(b.total.detach()))
    assert_close(a.total, b.total, torch.float32, Kind.REASSOCIATED, "filler")
    for key in a.sums:
        assert_close(a.sums[key], b.sums[key], torch.float32, Kind.REASSOCIATED, key)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_is_scored_where_transformers_scores_it(family: str, tiny: Any) -> None:
    """For each architecture of the matrix: its sequence classifier's head is found (a
    reward model of that family is built), and packed pairs are scored per sequence as
    transformers scores each sequence alone (eval mode, fp32)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny.model_dir)
    config = family_config(family, tokenizer)
    config.num_labels, config._attn_implementation = 1, "eager"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).float().eval()
    pad = tokenizer.pad_token_id
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(2):
        prompt = [int(x) for x in rng.integers(3, len(tokenizer), 5)]
        for _side in range(2):
            reply = [int(x) for x in rng.integers(3, len(tokenizer), 4)]
            rows.append((prompt + reply, [IGNORE] * 5 + reply))
    batch = collate_units(pair_split(rows), [np.array([0, 1])], pad, "eager", False)
    with torch.no_grad():
        out = Reward(RewardConfig(), pad)(model, batch)
        r = torch.stack([plain_reward(model, ids) for ids, _ in rows])
    # the same fp32 model, a packed row (block mask) vs each sequence alone
    assert_close(out.sums["rewards/chosen"], r[0::2].sum(), torch.float32, Kind.REASSOCIATED)
    assert_close(out.sums["rewards/rejected"], r[1::2].sum(), torch.float32, Kind.REASSOCIATED)
