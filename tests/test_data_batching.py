"""Batching strategies against one-by-one training with the tiny model (fp32, CPU):
packed and length-grouped steps give the same loss and gradients, packed samples do not
attend to each other, and the order is a pure, world-size independent function of the
step. The tiny Llama has no sliding window (`windowed=False`: packed rows carry the 4-D
mask); models with windows are in tests/test_sliding_window.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distft.assets import TinyAssets
from distft.config import from_dict
from distft.data import (
    IGNORE,
    Split,
    TrainBatches,
    collate_rows,
    read_conversations,
    step_layout,
)
from distft.data.packing import Units, best_fit_decreasing, length_groups
from distft.data.prefetch import Prefetcher
from distft.data.tokenize import Encoder, EncodeSettings, TokenizeReport
from distft.dist import DistContext
from distft.objectives import nll_sum
from distft.tolerance import Kind, assert_close

STRATEGIES = ("packed", "length_grouped", "padded")


@pytest.fixture(scope="module")
def tok(tiny: TinyAssets) -> Any:
    return AutoTokenizer.from_pretrained(tiny.model_dir)


@pytest.fixture(scope="module")
def split(tiny: TinyAssets, tok: Any) -> Split:
    """Variable-length chat samples (single and multi-turn, some with a system prompt)."""
    convs, _ = read_conversations([str(tiny.chat_train_file)])
    rows = list(
        Encoder(tok, EncodeSettings(128)).encode_many(convs[:64], "error", TokenizeReport())
    )
    return Split.from_lists([r[0].tolist() for r in rows], [r[1].tolist() for r in rows])


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request: pytest.FixtureRequest, tiny: TinyAssets) -> Any:
    m = AutoModelForCausalLM.from_pretrained(
        tiny.model_dir, dtype=torch.float32, attn_implementation=request.param
    )
    return m.train()


def make_cfg(batching: str, micro: int, accum: int, epochs: int = 1, **data: Any) -> Any:
    return from_dict(
        {
            "seed": 5,
            "model": {"name_or_path": "unused", "attn_implementation": data.pop("attn", "sdpa")},
            "data": {"train_files": ["unused"], "batching": batching, "max_seq_len": 128, **data},
            "batch": {"micro_batch_size": micro, "grad_accum": accum, "epochs": epochs},
            "checkpoint": {"output_dir": "unused"},
        }
    )


def ctx(rank: int, world: int) -> DistContext:
    return DistContext(rank, world, rank, torch.device("cpu"))


def step_loss_and_grads(model: Any, micro_batches: list) -> tuple[float, torch.Tensor]:
    """The loop's objective for one optimizer step: (1/T) * sum of summed token NLLs."""
    model.zero_grad(set_to_none=True)
    total_targets = sum(b.n_targets for b in micro_batches)
    loss = 0.0
    for b in micro_batches:
        s = nll_sum(model, b)
        (s / total_targets).backward()
        loss += s.item() / total_targets
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return loss, grads


@pytest.mark.parametrize("batching", STRATEGIES)
def test_a_step_matches_its_samples_one_by_one(model: Any, split: Split, batching: str) -> None:
    attn = model.config._attn_implementation
    cfg = make_cfg(batching, micro=2, accum=2, attn=attn)
    world = 2
    micro_batches, samples = [], []
    for rank in range(world):  # every rank runs the same number of micro-batches
        tb = TrainBatches(split, cfg, ctx(rank, world), pad_id=0, windowed=False)
        mine = tb.for_step(1)
        assert len(mine) == cfg.batch.grad_accum
        micro_batches += mine
        samples += [int(i) for rows in tb.indices_for_step(1) for row in rows for i in row]
    assert len(samples) == len(set(samples)) > 4
    if batching == "packed":  # masks are built where the batch runs, not by the collator
        assert all(b.attention_mask is None for b in micro_batches)
        masked = [b.to(torch.device("cpu")) for b in micro_batches if b.mask is not None]
        assert masked and all(b.attention_mask.dim() == 4 for b in masked)
        assert all(b.position_ids is not None for b in masked)
    if batching == "length_grouped":
        assert any(b.input_ids.shape[0] > cfg.batch.micro_batch_size for b in micro_batches)
    if batching != "packed":  # right-padded rows, exact without any attention mask
        assert all(b.attention_mask is None for b in micro_batches)
        assert any(b.n_tokens < b.input_ids.numel() for b in micro_batches)
    one_by_one = [collate_rows([[split.sample(i)]], 0) for i in samples]
    assert all(b.attention_mask is None and b.position_ids is None for b in one_by_one)
    assert sum(b.n_targets for b in micro_batches) == sum(b.n_targets for b in one_by_one)
    assert sum(b.n_tokens for b in micro_batches) == int(split.lengths[samples].sum())

    loss, grads = step_loss_and_grads(model, micro_batches)
    ref_loss, ref_grads = step_loss_and_grads(model, one_by_one)
    # exact in real arithmetic; in fp32 packed rows and single samples reduce in other
    # orders (other matmul shapes): reassociated fp32 (distft.tolerance), gradients
    # relative to their own size
    assert_close(loss, ref_loss, torch.float32, Kind.REASSOCIATED, "loss")
    scale = float(ref_grads.abs().max())
    assert_close(grads, ref_grads, torch.float32, Kind.REASSOCIATED, "gradients", scale)
    assert ref_grads.abs().max().item() > 1e-3  # the comparison is not between zeros


def test_packed_samples_do_not_attend_to_each_other(model: Any, split: Split) -> None:
    attn = model.config._attn_implementation
    a, b = split.sample(0), split.sample(1)
    n_a, n_b = len(a[0]), len(b[0])

    def logits_of_b(first: tuple[np.ndarray, np.ndarray], **overrides: Any) -> torch.Tensor:
        batch = collate_rows([[first, b]], pad_id=0, attn=attn)
        inputs = {**batch.model_inputs(), **overrides}
        with torch.no_grad():
            return model(**inputs).logits[0, n_a : n_a + n_b]

    perturbed = (np.roll(a[0], 3) % 400 + 7).astype(np.int32), a[1]
    assert not np.array_equal(perturbed[0], a[0])
    base = logits_of_b(a)
    # A's tokens reach B only through masked scores (probability exactly 0): the same
    # shapes and kernels, so only the kernels' own rounding may differ
    assert_close(logits_of_b(perturbed), base, torch.float32, Kind.RECOMPUTED, "perturbed A")
    with torch.no_grad():
        alone = model(input_ids=torch.from_numpy(b[0][None]).long()).logits[0]
    assert_close(base, alone, torch.float32, Kind.REASSOCIATED, "B alone")  # other shapes
    # Control: the same row with a plain causal mask and positions lets B see A.
    plain = {"attention_mask": None, "position_ids": None}
    assert not torch.allclose(logits_of_b(a, **plain), logits_of_b(perturbed, **plain), atol=1e-3)


def test_a_mask_only_for_packed_rows() -> None:
    s = [(np.array([1, 2, 3]), np.array([IGNORE, 2, 3])), (np.array([4, 5]), np.array([IGNORE, 5]))]
    same = collate_rows([[s[0]], [s[0]]], pad_id=0)
    assert same.attention_mask is None and same.position_ids is None and same.n_tokens == 6
    padded = collate_rows([[s[0]], [s[1]]], pad_id=0)  # right padding: causal is enough
    assert padded.attention_mask is None and padded.position_ids is None
    assert padded.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]] and padded.n_tokens == 5
    packed = collate_rows([[s[0], s[1]], [s[1]]], pad_id=0)
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert packed.labels.tolist() == [[IGNORE, 2, 3, IGNORE, 5], [IGNORE, 5] + [IGNORE] * 3]
    assert packed.attention_mask is None and packed.mask == "bool"  # built where it runs
    mask = packed.to(torch.device("cpu")).attention_mask
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],  # the second sample starts a new causal block
        [0, 0, 0, 1, 1],
    ]
    assert mask[1, 0, 4].int().tolist() == [0, 0, 1, 1, 1]  # padding attends only to itself
    assert packed.n_tokens == 7 and packed.n_targets == 4
    eager = collate_rows([[s[0], s[1]]], pad_id=0, attn="eager").to(torch.device("cpu"))
    assert eager.attention_mask.dtype == torch.float32
    assert torch.equal(eager.attention_mask == 0, mask[:1])
    flash = collate_rows([[s[0], s[1]], [s[1]]], pad_id=0, attn="flash_attention_2")
    assert flash.attention_mask is None and flash.input_ids.shape == (1, 7)
    assert flash.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1]]


def numpy_block_mask(rows: list[list[int]], width: int) -> np.ndarray:
    """The mask the collator used to build on the host: sample k of a row is block k, the
    row's padding one more block; causal inside each block."""
    seg = np.zeros((len(rows), width), dtype=np.int64)
    for i, lengths in enumerate(rows):
        seg[i] = np.repeat(np.arange(len(lengths) + 1), [*lengths, width - sum(lengths)])
    causal = np.tril(np.ones((width, width), dtype=bool))
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def test_packed_rows_carry_no_host_mask_and_build_the_same_one_where_they_run() -> None:
    rng = np.random.default_rng(0)
    for trial in range(20):
        rows = [list(rng.integers(1, 9, size=rng.integers(1, 5))) for _ in range(3)]
        rows[0] = rows[0] + [1, 2]  # at least one packed row (several samples)
        samples = [[(np.arange(m) + 1, np.arange(m) + 1) for m in r] for r in rows]
        width = max(sum(r) for r in rows)
        want = torch.from_numpy(numpy_block_mask(rows, width))
        for attn, kind in [("sdpa", "bool"), ("eager", "additive")]:
            batch = collate_rows(samples, pad_id=0, attn=attn)
            assert batch.attention_mask is None and batch.mask == kind  # nothing n x w x w
            built = batch.to(torch.device("cpu")).attention_mask
            got = built if kind == "bool" else built == 0
            assert torch.equal(got, want), (trial, attn)  # booleans: exact
            assert torch.equal(batch.model_inputs()["attention_mask"], built)
            if kind == "additive":  # 0 where attended, float32's minimum elsewhere
                assert built.dtype == torch.float32
                assert set(built.unique().tolist()) <= {0.0, torch.finfo(torch.float32).min}
    windowed = collate_rows(samples, pad_id=0, windowed=True)  # transformers builds it
    assert windowed.mask is None and windowed.to(torch.device("cpu")).attention_mask is None


def test_best_fit_decreasing_packs_tightly_and_deterministically() -> None:
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(150), 0.9, size=3000).astype(np.int64), 5, 1024)
    units = best_fit_decreasing(lengths, 1024)
    assert sorted(units.members.tolist()) == list(range(3000))  # each sample in one pack
    loads = np.add.reduceat(lengths[units.members], units.bounds[:-1])
    assert loads.max() <= 1024
    lower_bound = -(-int(lengths.sum()) // 1024)
    assert len(units) <= lower_bound * 1.02 + 1  # within 2% of the optimum here
    again = best_fit_decreasing(lengths, 1024)
    assert np.array_equal(again.members, units.members)
    assert np.array_equal(again.bounds, units.bounds)


def test_units_reorder_keeps_each_unit_whole() -> None:
    units = Units(np.array([10, 11, 20, 21, 22, 30]), np.array([0, 2, 5, 6]))
    moved = units.reorder(np.array([2, 0, 1]))
    assert [moved.unit(k).tolist() for k in range(3)] == [[30], [10, 11], [20, 21, 22]]
    assert moved.remap(np.arange(40) * 2).unit(1).tolist() == [20, 22]


def test_length_groups_stay_within_the_budget() -> None:
    lengths = np.sort(np.random.default_rng(1).integers(1, 300, size=500))
    bounds = length_groups(lengths, 600)
    assert bounds[0] == 0 and bounds[-1] == 500
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        assert b > a and (b - a) * lengths[b - 1] <= 600
        if b < 500:  # greedy: the next sample would not have fit
            assert (b - a + 1) * lengths[b] > 600


@pytest.mark.parametrize("batching", STRATEGIES)
def test_epochs_cover_every_sample_once(split: Split, batching: str) -> None:
    tb = TrainBatches(split, make_cfg(batching, 2, 1), ctx(0, 1), 0, windowed=False)
    orders = []
    for epoch in (0, 1):
        units = tb.units(epoch)
        assert sorted(units.members.tolist()) == list(range(len(split)))
        orders.append(units.members.tolist())
    assert orders[0] != orders[1]  # reshuffled per epoch
    unshuffled = TrainBatches(split, make_cfg(batching, 2, 1, shuffle=False), ctx(0, 1), 0)
    assert unshuffled.units(0).members.tolist() == unshuffled.units(1).members.tolist()


@pytest.mark.parametrize("batching", STRATEGIES)
def test_step_windows_do_not_depend_on_world_size(split: Split, batching: str) -> None:
    """A step is the same set of samples whether 1, 2 or 4 ranks split it, so a run can
    resume on a different world size at the same global step."""
    per_world = {}
    for world, accum in ((1, 4), (2, 2), (4, 1)):
        cfg = make_cfg(batching, 2, accum)
        steps = []
        for step in range(3):
            samples = []
            for rank in range(world):
                tb = TrainBatches(split, cfg, ctx(rank, world), pad_id=0, windowed=False)
                micro = tb.indices_for_step(step)
                assert len(micro) == accum  # equal micro-batch counts on every rank
                samples += [int(i) for rows in micro for row in rows for i in row]
            steps.append(samples)
        per_world[world] = (steps, tb.samples_seen(3), tb.steps_per_epoch, step_layout(cfg, world))
    assert per_world[1] == per_world[2] == per_world[4]
    steps, seen, _, _ = per_world[1]
    assert seen == sum(len(s) for s in steps)


def test_step_layout_names_what_a_resplit_must_keep() -> None:
    for batching in ("padded", "packed"):  # micro x accum x workers is what counts
        assert step_layout(make_cfg(batching, 2, 2), 2) == step_layout(make_cfg(batching, 4, 1), 2)
    # length-grouped: the token budget is micro_batch_size x max_seq_len, so micro counts
    grouped = step_layout(make_cfg("length_grouped", 2, 2), 2)
    assert grouped == {"batching": "length_grouped", "units_per_step": 4, "unit_tokens": 256}
    assert grouped != step_layout(make_cfg("length_grouped", 4, 1), 2)
    assert grouped == step_layout(make_cfg("length_grouped", 2, 4), 1)


@pytest.mark.parametrize("batching", STRATEGIES)
def test_resume_at_any_step_sees_the_same_batches(split: Split, batching: str) -> None:
    cfg = make_cfg(batching, 2, 2, epochs=3)
    ran = TrainBatches(split, cfg, ctx(1, 2), pad_id=0, windowed=False)
    history = [ran.for_step(s) for s in range(ran.total_steps)]
    for s in (0, ran.steps_per_epoch - 1, ran.steps_per_epoch, ran.total_steps - 1):
        fresh = TrainBatches(split, cfg, ctx(1, 2), pad_id=0, windowed=False)  # a restarted worker
        for got, want in zip(fresh.for_step(s), history[s], strict=True):
            assert torch.equal(got.input_ids, want.input_ids)
            assert torch.equal(got.labels, want.labels)
    seen = [ran.samples_seen(s) for s in range(ran.total_steps + 1)]
    assert seen[0] == 0 and all(b > a for a, b in zip(seen, seen[1:], strict=False))


def test_too_few_units_for_one_step(split: Split) -> None:
    tiny_split = split.select(np.arange(3))
    with pytest.raises(Exception) as e:
        TrainBatches(tiny_split, make_cfg("packed", 2, 2), ctx(0, 2), pad_id=0)
    assert str(e.value) == (
        "3 training samples (1 packs) are fewer than one global batch "
        "(2 micro x 2 accum x 2 workers)"
    )


@pytest.mark.parametrize("batching", STRATEGIES)
def test_prefetched_steps_are_the_steps(split: Split, batching: str) -> None:
    cfg = make_cfg(batching, micro=2, accum=2, attn="sdpa")
    tb = TrainBatches(split, cfg, ctx(0, 2), pad_id=0, windowed=False)
    cpu = torch.device("cpu")
    order = [0, 1, 2, 4, 5, 1]  # in order, then a skip and a step back: both still exact
    with Prefetcher(tb, cpu) as ahead:
        for step in order:
            got = [ahead.to_device(b) for b in ahead.take(step)]
            want = [b.to(cpu) for b in tb.for_step(step)]
            assert len(got) == len(want) == cfg.batch.grad_accum
            for g, w in zip(got, want, strict=True):
                for name in ("input_ids", "labels", "attention_mask", "position_ids"):
                    a, b = getattr(g, name), getattr(w, name)
                    assert (a is None and b is None) or torch.equal(a, b), (step, name)
                assert g.n_tokens == w.n_tokens and g.mask == w.mask
            if batching == "packed":  # the mask was built in the background, on the device
                assert all(g.attention_mask is not None for g in got if g.mask)
