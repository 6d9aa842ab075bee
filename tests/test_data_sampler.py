"""The padded per-rank sampler: global train windows independent of the world-size split,
a pure function of (seed, epoch, step); eval sharding with equal batch counts per rank."""

from __future__ import annotations

import pytest
import torch

from distft.config import Config, from_dict
from distft.data import IGNORE, DataError, Split, TrainBatches, eval_batches
from distft.dist import DistContext

# ----------------------------------------------------------------------------- sampler


def make_cfg(
    micro: int,
    accum: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    epochs: int = 1,
    batching: str = "padded",
):
    return from_dict(
        {
            "seed": seed,
            "model": {"name_or_path": "unused"},
            "data": {"train_files": ["unused.jsonl"], "shuffle": shuffle, "batching": batching},
            "batch": {"micro_batch_size": micro, "grad_accum": accum, "epochs": epochs},
            "checkpoint": {"output_dir": "unused"},
        }
    )


def ctx(rank: int, world: int) -> DistContext:
    return DistContext(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))


def synthetic(n: int, base: int = 0) -> Split:
    """Row i is [base+i]*3 so every sample's identity is readable from any token."""
    ids = [[base + i] * 3 for i in range(n)]
    return Split.from_lists(ids, [[IGNORE, base + i, base + i] for i in range(n)])


def step_samples(ds: Split, cfg: Config, world: int, step: int) -> list[int]:
    """Samples of one optimizer step, in rank order then micro-batch order."""
    out: list[int] = []
    for r in range(world):
        micro_batches = TrainBatches(ds, cfg, ctx(r, world), pad_id=0).for_step(step)
        assert len(micro_batches) == cfg.batch.grad_accum
        for b in micro_batches:
            assert b.input_ids.shape == (cfg.batch.micro_batch_size, 3)
            assert b.attention_mask is None
            out += b.input_ids[:, 0].tolist()
    return out


# world size -> (micro, accum) with micro * accum * world == 8
SPLITS = {1: (2, 4), 2: (2, 2), 4: (1, 2)}


def test_global_window_is_independent_of_world_size() -> None:
    ds = synthetic(50)
    per_world = {}
    for world, (micro, accum) in SPLITS.items():
        cfg = make_cfg(micro, accum, seed=3)
        tb = TrainBatches(ds, cfg, ctx(0, world), pad_id=0)
        assert tb.global_batch == 8
        assert tb.steps_per_epoch == 6  # 50 // 8: the last partial global batch is dropped
        per_world[world] = [step_samples(ds, cfg, world, s) for s in range(12)]
    steps = per_world[1]
    for world in (2, 4):
        for s in range(12):
            assert set(per_world[world][s]) == set(steps[s]), (world, s)
            assert per_world[world][s] == steps[s]  # contiguous slices: even the order agrees
    for epoch in (0, 1):
        seen = [x for s in range(6 * epoch, 6 * epoch + 6) for x in steps[s]]
        assert len(seen) == len(set(seen)) == 48  # no repeats within an epoch
        assert set(seen) <= set(range(50))
    assert steps[6:12] != steps[0:6]  # epoch 1 is a different permutation


def test_each_rank_gets_its_own_contiguous_slice() -> None:
    ds = synthetic(32)
    cfg = make_cfg(2, 2, seed=1)  # world 2 -> global batch 8
    whole = step_samples(ds, cfg, 2, 1)
    for r in range(2):
        mine = TrainBatches(ds, cfg, ctx(r, 2), pad_id=0).for_step(1)
        got = [x for b in mine for x in b.input_ids[:, 0].tolist()]
        assert got == whole[4 * r : 4 * r + 4]
    assert len(set(whole)) == 8


def test_order_is_a_pure_function_of_seed_and_epoch() -> None:
    ds = synthetic(40)
    cfg = make_cfg(4, 1, seed=7)
    a = TrainBatches(ds, cfg, ctx(0, 1), pad_id=0)
    b = TrainBatches(ds, cfg, ctx(0, 1), pad_id=0)

    def ids(tb: TrainBatches, step: int) -> list[int]:
        return tb.for_step(step)[0].input_ids[:, 0].tolist()

    # same seed: identical, whatever order the steps are asked for (resume = jump to a step)
    forward = [ids(a, s) for s in range(20)]
    backward = [ids(b, s) for s in reversed(range(20))][::-1]
    assert forward == backward
    epoch0 = [x for s in range(10) for x in forward[s]]
    epoch1 = [x for s in range(10, 20) for x in forward[s]]
    assert sorted(epoch0) == sorted(epoch1) == list(range(40))
    assert epoch0 != epoch1
    assert epoch0 != list(range(40))  # shuffled
    assert a.epoch_of(9) == 0 and a.epoch_of(10) == 1
    other = TrainBatches(ds, make_cfg(4, 1, seed=8), ctx(0, 1), pad_id=0)
    assert [x for s in range(10) for x in ids(other, s)] != epoch0


def test_no_shuffle_is_sequential() -> None:
    ds = synthetic(20)
    for world in (1, 2):
        cfg = make_cfg(4 // world, 2, shuffle=False)
        assert [step_samples(ds, cfg, world, s) for s in range(4)] == [
            list(range(0, 8)),
            list(range(8, 16)),
            list(range(0, 8)),  # epoch 1 starts over; 16..19 never fill a global batch
            list(range(8, 16)),
        ]


def test_total_steps() -> None:
    ds = synthetic(50)
    assert TrainBatches(ds, make_cfg(2, 2, epochs=3), ctx(0, 2), 0).total_steps == 3 * 6
    cfg = make_cfg(2, 2)
    cfg.batch.max_steps = 5
    assert TrainBatches(ds, cfg, ctx(0, 2), 0).total_steps == 5


def test_fewer_samples_than_one_global_batch() -> None:
    cfg = make_cfg(2, 2)
    TrainBatches(synthetic(8), cfg, ctx(1, 2), pad_id=0)  # exactly one global batch is fine
    with pytest.raises(DataError) as e:
        TrainBatches(synthetic(7), cfg, ctx(1, 2), pad_id=0)
    assert str(e.value) == (
        "7 training samples are fewer than one global batch (2 micro x 2 accum x 2 workers)"
    )


# ----------------------------------------------------------------------------- eval


@pytest.mark.parametrize(
    ("n", "world", "micro"), [(10, 4, 2), (10, 3, 4), (5, 4, 1), (8, 4, 2), (3, 4, 1), (7, 1, 3)]
)
def test_eval_batches_cover_the_split_once(n: int, world: int, micro: int) -> None:
    base = 1000
    ds = synthetic(n, base=base)
    per_rank = -(-n // world)
    n_batches = -(-per_rank // micro)
    real: list[int] = []
    fillers = 0
    targets = 0
    for r in range(world):
        batches = eval_batches(ds, micro, ctx(r, world), pad_id=0)
        assert len(batches) == n_batches  # same count on every rank (collective forwards)
        assert sum(b.input_ids.shape[0] for b in batches) == per_rank
        for b in batches:
            targets += b.n_targets
            for ids, labels in zip(b.input_ids.tolist(), b.labels.tolist(), strict=True):
                if all(lab == IGNORE for lab in labels):
                    fillers += 1
                    continue
                assert ids == [ids[0]] * 3 and labels == [IGNORE, ids[0], ids[0]]
                real.append(ids[0])
    assert sorted(real) == list(range(base, base + n))  # each eval sample exactly once
    assert fillers == world * per_rank - n
    assert targets == 2 * n  # filler rows add no targets


@pytest.mark.parametrize("batching", ["padded", "packed", "length_grouped"])
def test_step_totals_equal_the_sum_of_every_ranks_micro_batches(batching: str) -> None:
    """The loss normaliser is computed, not all-reduced: it must equal what the ranks'
    micro-batches hold, for every strategy, including the labels a packed row masks at
    each sample start (a sample's first token is never predicted from the previous one)."""
    import numpy as np

    rng = np.random.default_rng(0)
    ids, labels = [], []
    for i in range(60):
        n = int(rng.integers(4, 30))
        ids.append([1 + i % 7] * n)
        # all-token training: the first label is a real token too, as `from_lists` allows
        labels.append([1 + i % 7] * n if i % 3 == 0 else [IGNORE] * (n // 2) + [5] * (n - n // 2))
    split = Split.from_lists(ids, labels)
    world = 2
    for micro, accum in [(2, 2), (1, 3)]:
        cfg = make_cfg(micro, accum, batching=batching, epochs=2)
        cfg.data.max_seq_len = 64
        ranks = [
            TrainBatches(split, cfg, ctx(r, world), pad_id=0, windowed=False) for r in range(world)
        ]
        for step in range(ranks[0].total_steps):
            batches = [b for tb in ranks for b in tb.for_step(step)]
            totals = ranks[0].step_totals(step)
            assert totals == ranks[1].step_totals(step)
            assert totals.targets == sum(b.n_targets for b in batches), (micro, accum, step)
            assert totals.tokens == sum(b.n_tokens for b in batches)
            lengths = [
                len(s_ids)
                for tb in ranks
                for rows in tb.indices_for_step(step)
                for row in rows
                for s_ids in (split.sample(int(i))[0] for i in row)
            ]
            assert totals.squared_lengths == sum(n * n for n in lengths)
