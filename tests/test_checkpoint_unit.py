"""Checkpoint coordinator pieces that need no process group: verification, retention,
resume selection, fingerprints, RNG round trip, preemption flag, fault spec."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from distft import faults
from distft.checkpoint import (
    MANIFEST,
    STATE,
    CheckpointCoordinator,
    CheckpointError,
    TrainState,
    preempt,
    rng_state,
    set_rng_state,
)
from distft.checkpoint.fingerprint import fingerprint, fingerprint_changes, hash_file
from distft.config import Config, from_dict
from distft.dist import DistContext

ONE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def fake_checkpoint(
    root: Path, step: int, eval_loss: float | None = None, eval_step: int | None = None
) -> Path:
    """A committed-looking step dir with a real manifest over two files. Its eval loss was
    measured at `eval_step` (default: at `step`, when there is one)."""
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "shard.bin").write_bytes(bytes(range(256)) * (step + 1))
    if eval_step is None and eval_loss is not None:
        eval_step = step
    state = {"step": step, "eval_loss": eval_loss, "eval_step": eval_step}
    (d / STATE).write_text(json.dumps(state))
    files = {
        n: {"size": (d / n).stat().st_size, "xxh3_128": hash_file(d / n)}
        for n in ("shard.bin", STATE)
    }
    (d / MANIFEST).write_text(json.dumps({"step": step, "files": files}))
    return d


def test_verify_accepts_intact_and_names_each_kind_of_damage(tmp_path: Path) -> None:
    c = CheckpointCoordinator(tmp_path, ONE, keep_last=5)
    good = fake_checkpoint(tmp_path, 1)
    assert c.verify(good) is None
    flipped = fake_checkpoint(tmp_path, 2)
    data = bytearray((flipped / "shard.bin").read_bytes())
    data[7] ^= 0x80
    (flipped / "shard.bin").write_bytes(bytes(data))
    assert c.verify(flipped) == f"{flipped}: shard.bin does not match its hash (corrupted)"
    torn = fake_checkpoint(tmp_path, 3)
    (torn / "shard.bin").write_bytes(b"short")
    assert c.verify(torn) == f"{torn}: shard.bin has 5 bytes, manifest says 1024"
    missing = fake_checkpoint(tmp_path, 4)
    (missing / "shard.bin").unlink()
    assert c.verify(missing) == f"{missing}: missing file shard.bin"
    garbled = fake_checkpoint(tmp_path, 5)
    (garbled / MANIFEST).write_text("{not json")
    assert (c.verify(garbled) or "").startswith(f"{garbled}: unreadable manifest")


def test_find_resume_skips_damaged_newest_and_never_uses_partial(tmp_path, capsys) -> None:
    c = CheckpointCoordinator(tmp_path, ONE, keep_last=5)
    fake_checkpoint(tmp_path, 3)
    newest = fake_checkpoint(tmp_path, 6)
    (newest / "shard.bin").write_bytes(b"x" * (newest / "shard.bin").stat().st_size)
    partial = tmp_path / ".partial" / "step_00000009"
    partial.mkdir(parents=True)
    (tmp_path / "step_00000012").mkdir()  # no manifest: never considered
    assert c.find_resume("auto") == tmp_path / "step_00000003"
    assert f"skipping checkpoint: {newest}: shard.bin does not match its hash" in (
        capsys.readouterr().out
    )
    assert c.find_resume("never") is None
    assert c.find_resume(str(tmp_path / "step_00000003")) == tmp_path / "step_00000003"
    with pytest.raises(CheckpointError, match="checkpoint.resume: .*step_00000006: shard.bin"):
        c.find_resume(str(newest))
    with pytest.raises(CheckpointError, match="no manifest"):
        c.find_resume(str(partial))


def test_retention_keeps_newest_and_best(tmp_path: Path) -> None:
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, None)]:
        fake_checkpoint(tmp_path, step, loss)
    CheckpointCoordinator(tmp_path, ONE, keep_last=2, keep_best=True)._retain()
    assert [p.name for p in sorted(tmp_path.glob("step_*"))] == [
        "step_00000002",  # best eval loss
        "step_00000004",
        "step_00000005",
    ]
    CheckpointCoordinator(tmp_path, ONE, keep_last=1)._retain()
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_00000005"]


def test_keep_best_ranks_only_eval_losses_measured_at_the_checkpoint_step(
    tmp_path: Path,
) -> None:
    """Eval every 2 steps, checkpoints every 3: the step-3 checkpoint carries the step-2 eval
    loss, which says nothing about the step-3 weights. It is no candidate for the best."""
    fake_checkpoint(tmp_path, 3, eval_loss=0.4, eval_step=2)  # stale
    fake_checkpoint(tmp_path, 6, eval_loss=0.6)  # measured at step 6
    fake_checkpoint(tmp_path, 9, eval_loss=0.4, eval_step=8)  # stale
    fake_checkpoint(tmp_path, 12, eval_loss=0.9)
    CheckpointCoordinator(tmp_path, ONE, keep_last=1, keep_best=True)._retain()
    assert [p.name for p in sorted(tmp_path.glob("step_*"))] == [
        "step_00000006",  # the best loss measured at a checkpoint's own step
        "step_00000012",
    ]


def test_train_state_records_the_step_of_its_eval_loss() -> None:
    s = TrainState(step=4)
    s.record_eval(0.5)
    assert (s.eval_loss, s.eval_step) == (0.5, 4)
    s.step = 6  # a later save without a new eval: the loss is not this step's
    assert s.eval_step != s.step
    s.record_eval(0.7)
    assert TrainState.from_json(json.dumps(asdict(s))) == s


def test_train_state_json_ignores_unknown_keys() -> None:
    s = TrainState(step=7, samples_seen=112, wandb_run_id="abc", eval_loss=1.5)
    text = json.dumps({**asdict(s), "from_the_future": 1})
    assert TrainState.from_json(text) == s


def test_rng_state_round_trips_through_json() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    saved = json.loads(json.dumps(rng_state(torch.device("cpu"))))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(saved, torch.device("cpu"))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def _cfg(tmp_path: Path, **batch: int) -> Config:
    data = tmp_path / "t.jsonl"
    if not data.exists():
        data.write_text('{"instruction": "a", "output": "b"}\n')
    return from_dict(
        {
            "model": {"name_or_path": "org/model"},
            "data": {"train_files": [str(data)]},
            "batch": {"micro_batch_size": 4, "grad_accum": 2, **batch},
            "cluster": {"num_workers": 2},
            "checkpoint": {"output_dir": str(tmp_path / "out")},
        }
    )


def test_fingerprint_tracks_trajectory_not_layout(tmp_path: Path) -> None:
    base = fingerprint(_cfg(tmp_path))
    # the same global batch split differently, a time box, logging: not a change
    same = _cfg(tmp_path, grad_accum=4, stop_after_steps=3)
    same.cluster.num_workers = 1
    same.logging.every_n_steps = 7
    assert fingerprint_changes(base, fingerprint(same)) == []
    lr = _cfg(tmp_path)
    lr.optim.lr = 1.0
    assert fingerprint_changes(base, fingerprint(lr)) == ["optim"]
    (tmp_path / "t.jsonl").write_text('{"instruction": "a", "output": "c"}\n')
    assert fingerprint_changes(base, fingerprint(_cfg(tmp_path))) == ["data_files"]
    bigger = _cfg(tmp_path, micro_batch_size=8)
    assert "batch" in fingerprint_changes(base, fingerprint(bigger))


def test_fingerprint_follows_the_step_layout_of_each_batching(tmp_path: Path) -> None:
    """Padded batches of 2 x 4 accum hold the same samples as 4 x 2; length-grouped
    micro-batches are token budgets of micro x max_seq_len, so a smaller micro-batch with
    more accumulation is a different trajectory."""

    def fp(batching: str, micro: int, accum: int) -> dict[str, str]:
        cfg = _cfg(tmp_path, micro_batch_size=micro, grad_accum=accum)
        cfg.data.batching = batching  # type: ignore[assignment]
        return fingerprint(cfg)

    assert fingerprint_changes(fp("padded", 4, 2), fp("padded", 2, 4)) == []
    assert fingerprint_changes(fp("packed", 4, 2), fp("packed", 2, 4)) == []
    assert fingerprint_changes(fp("length_grouped", 4, 2), fp("length_grouped", 2, 4)) == ["batch"]
    moved = _cfg(tmp_path)
    moved.data.cache_dir = str(tmp_path / "elsewhere")
    assert fingerprint_changes(fingerprint(_cfg(tmp_path)), fingerprint(moved)) == []


def test_fingerprint_hashes_files_inside_data_folders(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    cfg = _cfg(tmp_path)
    cfg.data.train_files = [str(folder)]
    before = fingerprint(cfg)
    (folder / "a.jsonl").write_text('{"instruction": "a", "output": "B"}\n')
    assert fingerprint_changes(before, fingerprint(cfg)) == ["data_files"]


def test_lora_fingerprint_names_the_base_weights_the_checkpoint_leaves_out(tmp_path: Path) -> None:
    """A LoRA checkpoint holds no base weights, so the resume must find the same base files
    (by name, size and mtime: no 16 GB read at start); a fingerprint saved before that
    check existed has no such key, and nothing is compared for it."""
    import os

    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "model.safetensors").write_bytes(b"x" * 64)
    cfg = _cfg(tmp_path)
    cfg.model.name_or_path = str(base_dir)
    cfg.lora.enabled = True
    before = fingerprint(cfg)
    assert "base_weights" in before and "base_weights" not in fingerprint(_cfg(tmp_path))
    os.utime(base_dir / "model.safetensors", ns=(1, 1))  # replaced by another copy
    assert fingerprint_changes(before, fingerprint(cfg)) == ["base_weights"]
    older = {k: v for k, v in before.items() if k != "base_weights"}
    assert fingerprint_changes(older, fingerprint(cfg)) == []


def test_lora_load_may_miss_only_frozen_parameters() -> None:
    from distft.checkpoint import load_trainable

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    saved = {k: v.clone() + 1 for k, v in model.state_dict().items() if k.startswith("1.")}
    frozen = model[0].weight.clone()
    load_trainable(saved, model)
    assert torch.equal(model[1].weight, saved["1.weight"]) and torch.equal(model[0].weight, frozen)
    with pytest.raises(CheckpointError, match=r"missing \['1.bias'\]"):
        load_trainable({"1.weight": saved["1.weight"]}, model)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_trainable({**saved, "2.weight": frozen}, model)


def test_preempt_flag_and_signal_handler(tmp_path: Path) -> None:
    import os
    import signal

    assert not preempt.requested(tmp_path)
    with preempt.on_signal(tmp_path) as seen:
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    assert preempt.requested(tmp_path)
    preempt.clear(tmp_path)
    assert not preempt.requested(tmp_path)
    assert signal.getsignal(signal.SIGTERM) is not None  # previous handler restored


def test_fault_spec_matches_point_step_and_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "save:4:1")
    faults.maybe_crash("save", 3, 1)  # other step: nothing happens
    faults.maybe_crash("save", 4, 0)  # other rank: nothing happens
    faults.maybe_crash("load", 4, 1)  # other point: nothing happens
    monkeypatch.delenv(faults.ENV)
    faults.maybe_crash("save", 4, 1)  # unset: nothing happens


# ------------------------------------------------------------------ restricted unpickling


def _deepspeed_fp16_file(path: Path) -> Any:
    """A file as DeepSpeed's ZeRO optimizer checkpoint holds it under our fp16 config
    (`loss_scale: 0`, dynamic): its loss scaler object in the state dict, torch.saved."""
    from deepspeed.checkpoint.constants import LOSS_SCALER
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler
    from deepspeed.runtime.precision_config import DeepSpeedFP16Config

    from distft.engine import build_ds_config

    cfg = from_dict(
        {
            "model": {"name_or_path": "tiny"},
            "data": {"train_files": ["train.jsonl"]},
            "checkpoint": {"output_dir": "out"},
            "deepspeed": {"precision": "fp16"},
            "cluster": {"gpus_per_worker": 1},
        }
    )
    fp16 = DeepSpeedFP16Config(**build_ds_config(cfg, 1)[0]["fp16"])
    assert fp16.loss_scale == 0  # dynamic
    scaler = CreateLossScaler(torch.float16, fp16.loss_scale, True, fp16.dynamic_loss_scale_args())
    torch.save({LOSS_SCALER: scaler, "fp32": [torch.ones(3)], "stage": 2}, path)
    return scaler


class NotDeepSpeed:
    pass


def test_fp16_dynamic_loss_scaler_unpickles_and_other_classes_do_not(tmp_path: Path) -> None:
    from deepspeed.checkpoint.constants import LOSS_SCALER
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from distft.export.consolidate import ConsolidationError, check_pickles
    from distft.safeload import checkpoint_engine as weights_only_checkpoint_engine

    ok = tmp_path / "ok"
    ok.mkdir()
    saved = _deepspeed_fp16_file(ok / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert type(saved) is DynamicLossScaler
    check_pickles(ok)  # what export runs before consolidating
    loaded = weights_only_checkpoint_engine().load(
        str(ok / "zero_pp_rank_0_mp_rank_00_optim_states.pt"), map_location="cpu"
    )  # what a resume runs
    scaler = loaded[LOSS_SCALER]
    assert type(scaler) is DynamicLossScaler
    assert vars(scaler) == vars(saved) and scaler.cur_scale == 2**16

    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"x": NotDeepSpeed()}, bad / "mp_rank_00_model_states.pt")
    with pytest.raises(ConsolidationError, match="refused to unpickle"):
        check_pickles(bad)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        weights_only_checkpoint_engine().load(str(bad / "mp_rank_00_model_states.pt"))


def test_the_reward_section_enters_the_fingerprint_only_when_trained(tmp_path: Path) -> None:
    """`objective.reward` came after runs were saved with the `objective` hash of the
    other methods' sections: those runs still resume, and a reward setting changes an
    SFT run's trajectory in nothing."""
    import json

    import xxhash

    base = _cfg(tmp_path)
    before = fingerprint(base)["objective"]
    d = base.redacted()["objective"]
    del d["reward"]
    d["dpo"]["reference"] = None
    # the hash the previous release computed for the same config
    assert before == xxhash.xxh3_64_hexdigest(json.dumps(d, sort_keys=True, default=str).encode())
    base.objective.reward.center_coefficient = 0.5
    assert fingerprint(base)["objective"] == before
