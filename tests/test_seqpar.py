"""Sequence parallelism (distft.seqpar): the slices, the ranks, the config checks, and the
loss of split sequences through DeepSpeed's real Ulysses attention over gloo.

gloo carries the all-to-all Ulysses needs on CPU tensors (torch 2.13: `all_to_all_single`
fp32 and bf16, and its autograd form, checked on 2 loopback processes), so the split loss
is tested here on 2 processes and the whole run in tests/test_seqpar_e2e.py.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from distft.config import ConfigError, from_dict
from distft.data import IGNORE, Batch
from distft.dist import DistContext
from distft.objectives import nll_sum, shifted_targets
from distft.seqpar import shard
from distft.tolerance import Kind, assert_close
from tests.support import tiny_config

PAD = 0


def _batch() -> Batch:
    """Two right-padded rows of width 7 (one of 5 real tokens); prompt tokens untrained."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, PAD, PAD]])
    labels = torch.tensor(
        [[IGNORE, IGNORE, 7, 8, 9, 10, 11], [IGNORE, 13, 14, 15, 16, IGNORE, IGNORE]]
    )
    return Batch(ids, labels, None, None, 12)


def test_slices_put_back_together_are_the_sequence_with_its_targets() -> None:
    batch = _batch()
    for sp in (2, 3, 4):
        parts = [shard(batch, sp, r, PAD, rows=3) for r in range(sp)]
        width = -(-7 // sp) * sp  # padded up to a multiple of sp
        assert {p.input_ids.shape for p in parts} == {(3, width // sp)}
        ids = torch.cat([p.input_ids for p in parts], dim=1)
        targets = torch.cat([p.shift_labels for p in parts if p.shift_labels is not None], dim=1)
        positions = torch.cat([p.position_ids for p in parts if p.position_ids is not None], 1)
        assert torch.equal(ids[:2, :7], batch.input_ids)
        assert (ids[:, 7:] == PAD).all() and (ids[2] == PAD).all()  # new columns, filler row
        # targets: shifted on the whole sequence, so a slice's last position predicts the
        # next slice's first token; the padding predicts nothing
        assert torch.equal(targets[:2, :7], shifted_targets(batch.labels))
        assert (targets[:, 7:] == IGNORE).all() and (targets[2] == IGNORE).all()
        assert torch.equal(positions, torch.arange(width).expand(3, width))
        assert sum(p.n_targets for p in parts) == batch.n_targets == 9
        assert all(p.attention_mask is None for p in parts)


def test_slice_boundary_target_is_the_next_slice_first_token() -> None:
    first, second = (shard(_batch(), 2, r, PAD, rows=2) for r in (0, 1))
    assert first.shift_labels is not None
    # row 0, position 3 predicts token 4 (label 9), the first token of the second slice
    assert int(first.shift_labels[0, -1]) == int(second.input_ids[0, 0]) == 9


def test_packed_positions_are_kept_and_continue_into_padding() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    pos = torch.tensor([[0, 1, 0, 1, 2]])  # two packed samples
    batch = Batch(ids, ids.clone(), None, pos, 5)
    parts = [shard(batch, 2, r, PAD, rows=1) for r in range(2)]
    got = torch.cat([p.position_ids for p in parts if p.position_ids is not None], dim=1)
    assert got.tolist() == [[0, 1, 0, 1, 2, 3]]


def test_too_many_rows_is_refused() -> None:
    with pytest.raises(ValueError, match="more than the 1 Ulysses expects"):
        shard(_batch(), 2, 0, PAD, rows=1)


def test_ranks_data_parallel_and_sequence_parallel() -> None:
    cpu = torch.device("cpu")
    views = [DistContext(r, 4, r, cpu, sp_size=2) for r in range(4)]
    assert [(d.dp_rank, d.sp_rank, d.dp_world_size) for d in views] == [
        (0, 0, 2),
        (0, 1, 2),
        (1, 0, 2),
        (1, 1, 2),
    ]
    data = views[3].data_view()
    assert (data.rank, data.world_size, data.sp_size) == (1, 2, 1)
    plain = DistContext(1, 2, 1, cpu)
    assert plain.data_view() is plain and plain.dp_world_size == 2


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"cluster": {"num_workers": 3}},
            "deepspeed.sequence_parallel_size: 2 must divide cluster.num_workers (3)",
        ),
        (
            {"model": {"attn_implementation": "eager"}},
            "deepspeed.sequence_parallel_size: 2 needs model.attn_implementation sdpa or "
            "flash_attention_2",
        ),
        (
            {"data": {"batching": "length_grouped"}},
            "deepspeed.sequence_parallel_size: 2 needs data.batching padded, packed or auto",
        ),
        (
            {"data": {"batching": "packed"}, "model": {"attn_implementation": "sdpa"}},
            "deepspeed.sequence_parallel_size: 2 with data.batching packed needs "
            "model.attn_implementation flash_attention_2 (got sdpa); use data.batching padded",
        ),
    ],
)
def test_bad_combinations_get_one_line(
    tiny: Any, tmp_path: Path, sections: dict[str, Any], message: str
) -> None:
    cfg = tiny_config(tiny, tmp_path / "run", deepspeed={"sequence_parallel_size": 2})
    for name, values in sections.items():
        cfg[name].update(values)
    with pytest.raises(ConfigError) as err:
        from_dict(cfg)
    assert message in str(err.value).splitlines()[0] or message in str(err.value)


def test_heads_that_do_not_split_are_refused_before_ray(tiny: Any, tmp_path: Path) -> None:
    from distft.errors import UserError
    from distft.model import check_model

    def cfg(sp: int) -> Any:
        raw = tiny_config(tiny, tmp_path / "run", deepspeed={"sequence_parallel_size": sp})
        raw["cluster"]["num_workers"] = sp
        return from_dict(raw)

    resolved, _ = check_model(cfg(4), local_only=True)  # 4 heads, 2 KV heads: 4 splits
    assert resolved is not None and resolved.model.attn_implementation == "sdpa"
    with pytest.raises(UserError) as err:
        check_model(cfg(8), local_only=True)
    assert str(err.value) == (
        "deepspeed.sequence_parallel_size: 8 must divide the model's 4 attention heads, and "
        "its 2 key/value heads must divide by it or it by them (Ulysses splits the heads "
        "over the ranks)"
    )


def test_size_must_be_positive(tiny: Any, tmp_path: Path) -> None:
    cfg = tiny_config(tiny, tmp_path / "run", deepspeed={"sequence_parallel_size": 0})
    with pytest.raises(ConfigError, match="deepspeed.sequence_parallel_size"):
        from_dict(cfg)


# ---------------------------------------------------------------- the loss over 2 ranks


def _model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def _long_batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (2, 23), generator=g)  # odd width: a padded column
    ids[1, 17:] = PAD
    labels = ids.clone()
    labels[:, :5] = IGNORE  # an untrained prompt
    labels[1, 17:] = IGNORE
    return Batch(ids, labels, None, None, 40)


def _rank(rank: int, port: int, out: str) -> None:
    import deepspeed

    from distft.seqpar import register, whole_sequences

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE="2",
    )
    torch.set_num_threads(1)  # two processes on a shared machine: no oversubscription
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    dist = DistContext(rank, 2, rank, torch.device("cpu"), sp_size=2)
    model = _model()
    mpu = _register(model, dist, register)
    assert mpu.get_sequence_parallel_world_size() == 2
    assert mpu.get_sequence_parallel_rank() == rank
    part = shard(_long_batch(), 2, dist.sp_rank, PAD, rows=2)
    loss = nll_sum(model, part)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    with torch.no_grad(), whole_sequences():  # the plain kernel: whole sequences per rank
        whole = nll_sum(model, _long_batch())
    torch.save({"loss": loss.detach(), "grads": grads, "whole": whole}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _register(model: Any, dist: DistContext, register: Any) -> Any:
    from distft.config import from_dict

    raw = {
        "model": {"name_or_path": "unused", "attn_implementation": "sdpa"},
        "data": {"train_files": ["unused.jsonl"], "batching": "padded"},
        "batch": {"micro_batch_size": 2},
        "deepspeed": {"sequence_parallel_size": 2},
        "cluster": {"num_workers": 2},
        "checkpoint": {"output_dir": "unused"},
    }
    return register(model, from_dict(raw), dist)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow  # two processes importing DeepSpeed and transformers
def test_split_loss_and_gradients_equal_the_whole_sequence(tmp_path: Path) -> None:
    """Two ranks, each holding half of every sequence, through Ulysses' all-to-alls:
    their NLL sums add up to the whole batch's, and their gradients (DeepSpeed sums them
    over the ranks) to the whole batch's gradients."""
    model = _model()
    want = nll_sum(model, _long_batch())
    want.backward()
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert min(float(g["loss"]) for g in got) > 0  # both slices hold targets
    # The same per-token terms, summed in two groups and added: reassociated in fp32.
    assert_close(got[0]["loss"] + got[1]["loss"], want.detach(), torch.float32, Kind.REASSOCIATED)
    for g in got:  # outside Ulysses each rank computes the whole batch (same function)
        assert_close(g["whole"], want.detach(), torch.float32, Kind.RECOMPUTED, "whole")
    for name, p in model.named_parameters():
        total = got[0]["grads"][name] + got[1]["grads"][name]
        assert_close(total, p.grad, torch.float32, Kind.REASSOCIATED, name)
    moved = max(float(p.grad.abs().max()) for p in model.parameters())
    assert moved > 1e-3  # the gradients are not all zero: the comparison means something
