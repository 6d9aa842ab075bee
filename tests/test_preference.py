"""Preference objectives against the papers' formulas, computed here from plain Hugging
Face forwards of each sequence alone (fp32): loss and gradients, for padded (one side a
row) and packed (a pack of pairs in one row, SDPA's block mask) batches. And the pair
batching: a pair's two sides always share a micro-batch, for every strategy."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distft.config import ObjectiveConfig, from_dict
from distft.data import IGNORE, PairSplit, Split
from distft.data.loader import TrainBatches, collate_units
from distft.dist import DistContext
from distft.objectives.preference import Preference
from distft.tolerance import Kind, assert_close

VOCAB = 64


def tiny_model(seed: int) -> Any:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(cfg).float()


def make_pairs(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Rows alternate chosen, rejected: a shared prompt (not trained) + a response."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        prompt = rng.integers(1, VOCAB, int(rng.integers(3, 8))).tolist()
        for _side in range(2):
            answer = rng.integers(1, VOCAB, int(rng.integers(2, 9))).tolist()
            rows.append((prompt + answer, [IGNORE] * len(prompt) + answer))
    return rows


def pair_split(rows: list[tuple[list[int], list[int]]]) -> PairSplit:
    return PairSplit(Split.from_lists([r[0] for r in rows], [r[1] for r in rows]))


def plain_logps(model: Any, ids: list[int], labels: list[int]) -> tuple[torch.Tensor, int]:
    """Summed log-prob of the labelled tokens of one sequence, alone, and their count."""
    logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(labels[1:])
    keep = target != IGNORE
    return logp[keep].gather(1, target[keep][:, None]).sum(), int(keep.sum())


def paper_loss(method: ObjectiveConfig, pol: list, ref: list) -> torch.Tensor:
    """Summed over pairs; pol/ref: per pair ((sum_c, n_c), (sum_r, n_r))."""
    total = torch.zeros(())
    for (c, nc), (r, nr), ((rc, _), (rr, _)) in zip(pol[0::2], pol[1::2], ref, strict=True):
        if method.method == "dpo" and method.dpo.loss == "sigmoid":
            h = method.dpo.beta * ((c - rc) - (r - rr))
            eps = method.dpo.label_smoothing
            total = (
                total - (1 - eps) * torch.log(torch.sigmoid(h)) - eps * torch.log(torch.sigmoid(-h))
            )
        elif method.method == "dpo":  # IPO, per-token means
            h = (c / nc - rc / nc) - (r / nr - rr / nr)
            total = total + (h - 1 / (2 * method.dpo.beta)) ** 2
        elif method.method == "simpo":
            b, g = method.simpo.beta, method.simpo.gamma
            total = total - torch.log(torch.sigmoid(b * c / nc - b * r / nr - g))
        else:  # ORPO: odds = p / (1 - p) with p the mean-token probability
            pc, pr = torch.exp(c / nc), torch.exp(r / nr)
            log_or = torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))
            total = total - c / nc - method.orpo.weight * torch.log(torch.sigmoid(log_or))
    return total


METHODS = {
    "dpo": {"method": "dpo", "dpo": {"beta": 0.5}},
    "dpo_smoothed": {"method": "dpo", "dpo": {"beta": 0.3, "label_smoothing": 0.2}},
    "ipo": {"method": "dpo", "dpo": {"loss": "ipo", "beta": 0.4}},
    "simpo": {"method": "simpo", "simpo": {"beta": 2.0, "gamma": 0.3}},
    "orpo": {"method": "orpo", "orpo": {"weight": 0.25}},
}


def objective_config(name: str) -> ObjectiveConfig:
    raw = {
        "model": {"name_or_path": "m"},
        "data": {"train_files": ["t.jsonl"], "format": "preference"},
        "checkpoint": {"output_dir": "o"},
        "objective": METHODS[name],
    }
    return from_dict(raw).objective


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", list(METHODS))
def test_loss_and_gradients_equal_the_papers_formula(name: str, packed: bool) -> None:
    method = objective_config(name)
    policy, reference = tiny_model(0), tiny_model(1)
    rows = make_pairs(3)
    split = pair_split(rows)
    with torch.no_grad():
        ref = [plain_logps(reference, ids, labels) for ids, labels in rows]
    split.reference = {id(split.parts[0]): np.array([float(s) for s, _ in ref], np.float32)}
    units = [np.array([0, 1, 2])] if packed else [np.array([k]) for k in range(3)]
    batch = collate_units(split, units, pad_id=0, attn="sdpa", windowed=False)
    assert (batch.position_ids is not None) == packed and batch.n_seqs == 6

    out = Preference(method)(policy, batch)
    ours = torch.autograd.grad(out.total, list(policy.parameters()))
    pol = [plain_logps(policy, ids, labels) for ids, labels in rows]
    ref_pairs = [(ref[2 * k], ref[2 * k + 1]) for k in range(3)]
    want = paper_loss(method, pol, ref_pairs)
    theirs = torch.autograd.grad(want, list(policy.parameters()))

    # the same fp32 sums, taken in another order and through other kernels (one row per
    # sequence vs the batch's rows, SDPA with or without a block mask)
    assert_close(out.total.detach(), want.detach(), torch.float32, Kind.REASSOCIATED, name)
    for a, b, (pname, _) in zip(ours, theirs, policy.named_parameters(), strict=True):
        assert_close(a, b, torch.float32, Kind.REASSOCIATED, f"{name} grad {pname}")
    assert int(out.units) == 3
    assert float(out.sums["rewards/accuracy"]) in (0.0, 1.0, 2.0, 3.0)


def test_filler_pairs_count_for_nothing() -> None:
    """An evaluation filler (a pair with no response token) adds no loss, no gradient,
    no unit and no metric (and no NaN from an empty side's mean)."""
    method = objective_config("orpo")
    policy = tiny_model(0)
    rows = make_pairs(2)
    split = pair_split(rows)
    full = collate_units(split, [np.array([0]), np.array([1])], 0, "sdpa", False)
    one = collate_units(split, [np.array([0])], 0, "sdpa", False)
    filler = ([5, 6], [IGNORE, IGNORE])
    with_filler = collate_units(
        pair_split(rows[:2] + [filler, filler]), [np.array([0]), np.array([1])], 0, "sdpa", False
    )
    a, b = Preference(method)(policy, one), Preference(method)(policy, with_filler)
    assert int(b.units) == 1 and math.isfinite(float(b.total.detach()))
    assert_close(a.total, b.total, torch.float32, Kind.REASSOCIATED, "filler")
    assert int(Preference(method)(policy, full).units) == 2


@pytest.mark.parametrize("batching", ["padded", "length_grouped", "packed"])
def test_a_pairs_sides_share_a_micro_batch(batching: str) -> None:
    rows = make_pairs(40, seed=3)
    split = pair_split(rows)
    cfg = from_dict(
        {
            "model": {"name_or_path": "m", "attn_implementation": "sdpa"},
            "data": {"train_files": ["t.jsonl"], "format": "preference", "max_seq_len": 16,
                     "batching": batching},
            "batch": {"micro_batch_size": 2, "grad_accum": 2, "epochs": 1},
            "checkpoint": {"output_dir": "o"},
            "objective": {"method": "dpo"},
        }
    )  # fmt: skip
    seen: list[int] = []
    per_step: dict[int, int] = {}
    for rank in range(2):
        dist = DistContext(rank, 2, rank, torch.device("cpu"))
        batches = TrainBatches(split, cfg, dist, pad_id=0, windowed=False)
        for step in range(batches.steps_per_epoch):
            pairs_of = batches.indices_for_step(step)
            for mb, b in zip(pairs_of, batches.for_step(step), strict=True):
                pairs = [int(k) for row in mb for k in row]
                seen += pairs
                per_step[step] = per_step.get(step, 0) + len(pairs)
                assert b.n_seqs == 2 * len(pairs)
                for p, k in enumerate(pairs):  # sequence 2p: pair k's chosen side; 2p+1: rejected
                    for side in range(2):
                        ids = torch.from_numpy(split.rows.sample(2 * k + side)[0].astype(np.int64))
                        assert torch.equal(b.input_ids[b.seq_ids == 2 * p + side], ids)
    assert len(seen) == len(set(seen)) > 0  # each pair at most once per epoch
    for step, n in per_step.items():  # the loss normaliser: the step's pairs over all ranks
        assert batches.step_totals(step).targets == n


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_pairs_and_objective_must_agree(method: str, tiny: Any, tmp_path: Path) -> None:
    """`data.format: auto` reads a file of pairs as pairs: an SFT run on it (or a DPO run on
    single samples) is refused with the source named, not trained on both sides."""
    from transformers import AutoTokenizer

    from distft.data import DataError
    from distft.data.pipeline import build, load

    data = tiny.pref_train_file if method == "sft" else tiny.train_file
    cfg = from_dict(
        {
            "model": {"name_or_path": str(tiny.model_dir)},
            "data": {"train_files": [str(data)], "max_samples": 16,
                     "cache_dir": str(tmp_path / "cache")},
            "checkpoint": {"output_dir": str(tmp_path / "out")},
            "objective": {"method": method},
        }
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny.model_dir)
    build(cfg, tokenizer)
    with pytest.raises(DataError) as e:
        load(cfg, tokenizer)
    want = (
        "holds preference pairs; set objective.method"
        if method == "sft"
        else ("holds no preference pairs, which objective.method dpo trains on")
    )
    assert str(data) in str(e.value) and want in str(e.value), e.value


_MEMORY_STEP = r"""
import copy, sys, numpy as np, torch
from transformers import LlamaConfig, LlamaForCausalLM
from distft.config import ObjectiveConfig
from distft.data import IGNORE, PairSplit, Split
from distft.data.loader import collate_units
from distft.objectives.preference import Preference, sequence_logps
from distft.objectives.sft import Sft

mode = sys.argv[1]
torch.manual_seed(0)
config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                     num_hidden_layers=8, num_attention_heads=8, max_position_embeddings=512)
model = LlamaForCausalLM(config)  # ~58M params: 233 MB of fp32 weights, as many of grads
rng = np.random.default_rng(0)
ids, labels = [], []
for _ in range(8):  # 8 pairs: a 128-token prompt, two 128-token replies
    prompt = rng.integers(1, 32000, 128).tolist()
    for _side in range(2):
        reply = rng.integers(1, 32000, 128).tolist()
        ids.append(prompt + reply)
        labels.append([IGNORE] * 128 + reply)
pairs = PairSplit(Split.from_lists(ids, labels))
units = [np.array([k]) for k in range(8)]
batch = collate_units(pairs, units, 0, "sdpa", False)  # the same 16 rows for every mode
method = ObjectiveConfig(method="dpo")
if mode == "sft":
    objective = Sft(None)
elif mode == "precomputed":  # the reference's log-probs come with the batch (any values)
    batch = batch.__class__(**{**batch.__dict__, "ref_logps": torch.zeros(16)})
    objective = Preference(method)
else:  # resident: a frozen copy of the starting weights computes them every step
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    def reference(_model, b):
        with torch.no_grad():
            return sequence_logps(frozen, b)[0]
    objective = Preference(method, reference)
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS from here on
objective(model, batch).total.backward()
print("PEAK", hwm(), sum(p.numel() * p.element_size() for p in model.parameters()))
"""


def test_precomputed_reference_costs_no_memory() -> None:
    """Peak RSS of one step (forward + backward, fp32, CPU) of a ~58M-parameter model on 8
    pairs, each mode in a fresh process: DPO with precomputed reference log-probs within
    10% of SFT on the same 16 sequences; with a resident frozen copy, above SFT by at least
    most of the copy's weights. glibc is told to return every block of 128 KiB or more to
    the system when it is freed (`MALLOC_MMAP_THRESHOLD_`), so that RSS follows live memory
    and not what the allocator kept from building the models."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    peaks, weights = {}, 0
    for mode in ("sft", "precomputed", "resident"):
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_STEP, mode], capture_output=True, text=True,
            timeout=600, check=False, env=env,
        )  # fmt: skip
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK ")]
        assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
        peaks[mode], weights = int(lines[0].split()[1]), int(lines[0].split()[2])
    print("PEAK_RSS", {k: round(v / 2**20) for k, v in peaks.items()}, "MiB")
    assert abs(peaks["precomputed"] - peaks["sft"]) <= 0.10 * peaks["sft"], peaks
    assert peaks["resident"] - peaks["sft"] >= 0.8 * weights, (peaks, weights)
