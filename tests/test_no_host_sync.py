"""The objectives never make the host wait for the device: on a GPU, reading a value
(`.item()`, `int(t)`), selecting with a boolean mask or `nonzero` (the host needs the
count to size the result), `bincount` and `unique` each stop the CPU until the GPU has
caught up, so the next kernels are not queued in time. Where the batch's targets are is
found on the host when it is built (`distft.data.batch.Targets`); the objectives select
with `index_select` on that index.

CPU tensors run the same operators, so the test records every operator a forward and
backward dispatch (`TorchDispatchMode`) and lists those that need their result on the
host. It is exact: an operator is either dispatched or not. The objective's list must be
the model's own (the plain model call's, empty except where transformers itself reads),
so a transformers change shows up as such and not as distft's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distft.config import RewardConfig
from distft.data import IGNORE, Batch, collate
from distft.data.batch import collate_rows
from distft.data.loader import collate_units
from distft.dist import DistContext
from distft.objectives.preference import Preference
from distft.objectives.reward import Reward
from distft.objectives.sft import Sft
from distft.seqpar import shard
from distft.train import evaluate
from tests.test_preference import VOCAB, make_pairs, objective_config, pair_split, tiny_model
from tests.test_reward import PAD, reward_model

# What makes a CUDA caller wait: a value read on the host, or an output whose size
# depends on the data (the host must know it to allocate).
HOST_READS = {
    "_local_scalar_dense",  # .item(), int(t), float(t), bool(t)
    "is_nonzero",
    "equal",
    "allclose",
    "nonzero",
    "masked_select",
    "bincount",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "repeat_interleave",
}


class HostReads(TorchDispatchMode):
    """Records each dispatched operator that reads device data on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in HOST_READS or (name == "index" and _bool_index(args)):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or [])


def host_reads(fn: Callable[[], Any]) -> list[str]:
    with HostReads() as mode:
        fn()
    return mode.seen


def sft_batch(packed: bool) -> Batch:
    g = torch.Generator().manual_seed(1)
    rows = []
    for n, prompt in [(9, 5), (6, 2), (12, 11)]:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    if not packed:
        return collate(rows, pad_id=0)
    samples = [(np.asarray(r["input_ids"]), np.asarray(r["labels"])) for r in rows]
    return collate_rows([samples[:2], samples[2:]], pad_id=0, attn="sdpa")


def check(model: Any, objective: Any, batch: Batch) -> list[str]:
    """Asserts that the objective's forward and backward read on the host only what the
    model's own call does; returns that."""
    batch = batch.to(torch.device("cpu"))  # as the loop gets it: masks built, targets kept
    objective(model, batch)  # a first call decides once (the chunked head's probe)
    plain = host_reads(lambda: model(**batch.model_inputs()).logits.sum().backward())
    model.zero_grad(set_to_none=True)
    ours = host_reads(lambda: objective(model, batch).total.backward())
    assert ours == plain, f"the objective reads on the host: {ours}; the model alone: {plain}"
    return plain


@pytest.mark.parametrize("chunk", [None, 8], ids=["head", "chunked"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_sft_never_waits_for_the_device(packed: bool, chunk: int | None) -> None:
    assert check(tiny_model(0), Sft(chunk), sft_batch(packed)) == []


def test_sft_on_a_sequence_slice_never_waits_for_the_device() -> None:
    """Sequence parallelism's slices (`shift_labels`: targets taken before the split)."""
    part = shard(sft_batch(False), sp_size=2, sp_rank=1, pad_id=0, rows=3)
    assert part.n_targets > 0
    # transformers finds the packed samples of position ids without a mask on the host
    # (one read, the model's own: a varlen kernel needs the lengths there)
    assert check(tiny_model(0), Sft(None), part) == ["_local_scalar_dense"]


@pytest.mark.parametrize("method", ["dpo", "simpo", "orpo"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_preference_never_waits_for_the_device(method: str, packed: bool) -> None:
    split = pair_split(make_pairs(3, seed=1))
    units = [np.array([0, 1, 2])] if packed else [np.array([k]) for k in range(3)]
    batch = collate_units(split, units, pad_id=0, attn="sdpa", windowed=False)
    if method == "dpo":  # precomputed reference log-probs, as training reads them
        batch = replace(batch, ref_logps=torch.zeros(batch.n_seqs))
    assert check(tiny_model(0), Preference(objective_config(method)), batch) == []


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_reward_never_waits_for_the_device(packed: bool) -> None:
    split = pair_split(make_pairs(3, seed=1))
    units = [np.array([0, 1, 2])] if packed else [np.array([k]) for k in range(3)]
    batch = collate_units(split, units, pad_id=PAD, attn="sdpa", windowed=False)
    assert check(reward_model(0), Reward(RewardConfig(), PAD), batch) == []


def test_the_detector_sees_a_boolean_selection_and_an_item() -> None:
    """The test above can fail: the former target selection (a boolean mask of the
    labels, its count read as an int) is what it records."""
    labels = sft_batch(False).labels
    keep = labels != IGNORE
    assert host_reads(lambda: (labels[keep], int(keep.sum()))) == ["index", "_local_scalar_dense"]


def test_targets_are_found_on_the_host_and_travel_with_the_batch() -> None:
    b = sft_batch(True)
    targets = b.targets
    flat = torch.nn.functional.pad(b.labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
    assert torch.equal(targets.index, torch.nonzero(flat != IGNORE).view(-1))
    assert torch.equal(targets.tokens, flat[flat != IGNORE])
    assert b.n_targets == int((b.labels[:, 1:] != IGNORE).sum())
    # moved, not found again (finding them is a `nonzero`)
    assert host_reads(lambda: b.to(torch.device("cpu"))) == []
    assert torch.equal(b.to(torch.device("cpu")).targets.index, targets.index)


class Engine:
    """What `evaluate` asks of a DeepSpeed engine: its module, and a forward."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, **inputs: Any) -> Any:
        return self.module(**inputs)


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_evaluation_reads_once_at_the_end(method: str) -> None:
    """An eval pass keeps its sums on the device: the only read is the result's."""
    if method == "sft":
        model, objective = tiny_model(0), Sft(None)
        batches = [sft_batch(False), sft_batch(True)]
    else:
        model, objective = tiny_model(0), Preference(objective_config("dpo"))
        split = pair_split(make_pairs(4, seed=2))
        batches = [
            replace(b, ref_logps=torch.zeros(b.n_seqs))
            for b in (
                collate_units(split, [np.array([k]) for k in ks], 0, "sdpa", False)
                for ks in ([0, 1], [2, 3])
            )
        ]
    dist = DistContext(0, 1, 0, torch.device("cpu"))
    got: list[dict[str, float]] = []
    assert host_reads(lambda: got.append(evaluate(Engine(model), batches, dist, objective))) == []
    outs = [objective(model, b) for b in batches]
    units = sum(float(o.units) for o in outs)
    # the same float32 values summed in float64 in the same order: equal, not close
    assert got[0]["loss"] == sum(o.total.item() for o in outs) / units
    for k in objective.metrics:
        assert got[0][k] == sum(o.sums[k].item() for o in outs) / units


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["sft", "dpo", "reward"])
def test_on_a_gpu_nothing_waits_for_the_device(method: str) -> None:
    """The same on CUDA itself: PyTorch raises on any synchronizing call meanwhile."""
    cuda = torch.device("cuda")
    if method == "sft":
        model, objective, batch = tiny_model(0), Sft(8), sft_batch(False)
    else:
        split = pair_split(make_pairs(3, seed=1))
        units = [np.array([k]) for k in range(3)]
        batch = collate_units(split, units, pad_id=PAD, attn="sdpa", windowed=False)
        batch = replace(batch, ref_logps=torch.zeros(batch.n_seqs))
        if method == "dpo":
            model, objective = tiny_model(0), Preference(objective_config("dpo"))
        else:
            model, objective = reward_model(0), Reward(RewardConfig(), PAD)
    model, pinned = model.to(cuda), batch.pin_memory()  # pinned by the prefetch thread
    objective(model, pinned.to(cuda)).total.backward()  # the first call decides (the probe)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = pinned.to(cuda, non_blocking=True)  # as the loop moves a micro-batch
        objective(model, on_gpu).total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
