"""`distft export` and the end-of-training `final/`: ZeRO-2/3 full fine-tunes and a ZeRO-3
LoRA run on 2 CPU workers, trained once per module through the real CLI.

The chain of evidence: at the end of training rank 0 reloads `final/` with plain
transformers/peft and compares its logits with the live engine's (the run's log line is
checked here); `distft export` rebuilds the model from the checkpoint's ZeRO shards alone,
and its output must hold the same tensors as `final/`, load in a Python process that never
imports distft, and compute the same logits. The consolidation itself is compared with
DeepSpeed's own `zero_to_fp32` reader, tensor by tensor.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from distft.errors import UserError
from distft.export import export_checkpoint, verify_export
from distft.export.consolidate import iter_shards, plan_shards, read_layout
from distft.export.hf_folder import parse_size
from distft.export.verify import VerificationFailed
from distft.tolerance import Kind, assert_close
from tests.reference_runs import LORA_R, RUNS, TrainedRun
from tests.support import run_cli

DELTA = re.compile(r"max \|Δ\| ([0-9.e+-]+) \(bound ([0-9.e+-]+)\)")

# Runs in a fresh interpreter: loads folders as a user without distft would. Arguments:
# pairs of (folder, base model or ""); prints the logits of each on one fixed input.
PLAIN_LOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = []
for path, base in zip(sys.argv[1::2], sys.argv[2::2]):
    if base:
        from peft import PeftModel
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(base_model, path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    chat = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"] + list(range(3, 40))])
    with torch.no_grad():
        out.append(model.eval()(input_ids=ids).logits[0].tolist())
assert not any(m == "distft" or m.startswith("distft.") for m in sys.modules), "distft imported"
json.dump(out, sys.stdout)
"""


def plain_logits(*folders: Path | tuple[Path, Path]) -> list[torch.Tensor]:
    """Logits of each folder (a full model, or (adapter, base model)), in one process."""
    args = []
    for f in folders:
        path, base = f if isinstance(f, tuple) else (f, "")
        args += [str(path), str(base)]
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=Path(args[0]).parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.tensor(x) for x in json.loads(proc.stdout)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def export(*args: str) -> subprocess.CompletedProcess:
    return run_cli("export", *args)


def within_reported_bound(text: str) -> bool:
    """The verified line's max |Δ| is within the bound it states (`distft.tolerance`),
    and the bound is a rounding-sized one (at most 1e-3 for these fp32 runs)."""
    m = DELTA.search(text)
    assert m, text[-2000:]
    delta, bound = float(m.group(1)), float(m.group(2))
    return delta <= bound <= 1e-3


@pytest.fixture(scope="module")
def runs(trained: dict[str, TrainedRun]) -> dict[str, Path]:
    """The shared reference runs (tests/reference_runs.py): each rank 0 checked its
    `final/` against the live engine, and the run wrote its report."""
    for r in trained.values():
        log = r.proc.stdout + r.proc.stderr
        final_line = [line for line in log.splitlines() if "final model written" in line]
        assert final_line and within_reported_bound(final_line[0]), final_line
        assert (r.out / "report.html").is_file() and "report: " in r.proc.stdout
    return {name: r.out for name, r in trained.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2_full", "zero3_full"])
def test_full_export_is_sharded_verified_and_equals_final(
    name: str, runs: dict[str, Path], tmp_path: Path
) -> None:
    run = runs[name]
    dest = tmp_path / "hf"
    proc = export(str(run), "--out", str(dest), "--max-shard-size", "200KB")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert within_reported_bound(proc.stdout)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in dest.glob("model-*.safetensors"))
    assert len(shards) == 3 and shards[0] == "model-00001-of-00003.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    assert all(p.stat().st_size <= 200_000 for p in dest.glob("model-*.safetensors"))
    for f in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (dest / f).is_file(), f
    assert json.loads((dest / "config.json").read_text())["dtype"] == "float32"

    ours, final = weights(dest), weights(run / "final")
    assert ours.keys() == final.keys() == set(index["weight_map"])
    assert all(torch.equal(ours[k], final[k]) for k in ours)
    ours_logits, final_logits = plain_logits(dest, run / "final")
    # exact: identical tensors (checked above), run in one process by the same kernels
    assert torch.equal(ours_logits, final_logits)


@pytest.mark.slow
def test_lora_adapter_export_loads_in_peft_and_equals_final(
    runs: dict[str, Path], trained: dict[str, TrainedRun], tiny: Any, tmp_path: Path
) -> None:
    run, dest = runs["zero3_lora"], tmp_path / "adapter"
    proc = export(str(trained["zero3_lora"].latest_checkpoint()), "--out", str(dest))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert within_reported_bound(proc.stdout)
    assert "the adapter moves the base model's logits" in proc.stdout
    config = json.loads((dest / "adapter_config.json").read_text())
    assert config["r"] == LORA_R and config["base_model_name_or_path"] == str(tiny.model_dir)
    ours, final = weights(dest), weights(run / "final")
    assert len(ours) == 2 * 7 * 2  # lora_A + lora_B for 7 linear layers x 2 blocks
    assert ours.keys() == final.keys()
    assert all(t.numel() > 0 and torch.equal(t, final[k]) for k, t in ours.items())
    adapted, final_adapted, base = plain_logits(
        (dest, tiny.model_dir), (run / "final", tiny.model_dir), tiny.model_dir
    )
    assert torch.equal(adapted, final_adapted)  # exact: identical tensors, one process
    assert (adapted - base).abs().max() > 1e-2


@pytest.mark.slow
def test_merged_lora_matches_the_adapter(runs: dict[str, Path], tiny: Any, tmp_path: Path) -> None:
    run, dest = runs["zero3_lora"], tmp_path / "merged"
    proc = export(str(run), "--out", str(dest), "--merge-lora")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert within_reported_bound(proc.stdout)
    assert not (dest / "adapter_config.json").exists()
    assert not any(".lora_" in k for k in weights(dest))
    merged, adapted = plain_logits(dest, (run / "final", tiny.model_dir))
    # W + s·B·A folded vs applied: reassociated fp32 arithmetic (tolerance's budget)
    assert_close(merged, adapted, torch.float32, Kind.REASSOCIATED, "merged vs adapter")


@pytest.mark.slow
def test_bf16_export_is_the_fp32_masters_rounded(runs: dict[str, Path], tmp_path: Path) -> None:
    run, dest = runs["zero2_full"], tmp_path / "bf16"
    proc = export(str(run), "--out", str(dest), "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert within_reported_bound(proc.stdout)
    assert json.loads((dest / "config.json").read_text())["dtype"] == "bfloat16"
    ours, masters = weights(dest), weights(run / "final")
    assert all(torch.equal(ours[k], masters[k].to(torch.bfloat16)) for k in masters)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_consolidation_equals_deepspeeds_reader(name: str, trained: dict[str, TrainedRun]) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = trained[name].latest_checkpoint()
    lora = "lora" in name
    layout = read_layout(ckpt, trainable_only=lora)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ref = get_fp32_state_dict_from_zero_checkpoint(
            str(ckpt.parent), tag=ckpt.name, exclude_frozen_parameters=lora, lazy_mode=True
        )
    n, shards = iter_shards(layout, torch.float32, max_bytes=50_000)  # tensors span ranks
    got: dict[str, torch.Tensor] = {}
    for shard in shards:
        got.update(shard)
    assert n > 1 and got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k].contiguous()) for k in ref)


@pytest.mark.slow
def test_verification_catches_a_tampered_export(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["zero2_full"]
    good = tmp_path / "good"
    assert export(str(run), "--out", str(good)).returncode == 0
    tampered = {
        "scaled": lambda sd: sd["model.layers.1.mlp.down_proj.weight"].mul_(1.001),
        "swapped": lambda sd: sd.update(
            {
                "model.layers.0.mlp.up_proj.weight": sd["model.layers.0.mlp.gate_proj.weight"],
                "model.layers.0.mlp.gate_proj.weight": sd["model.layers.0.mlp.up_proj.weight"],
            }
        ),
        "dropped": lambda sd: sd.pop("model.norm.weight"),
    }
    for what, change in tampered.items():
        bad = tmp_path / what
        shutil.copytree(good, bad)
        sd = load_file(bad / "model.safetensors")
        change(sd)
        save_file(sd, bad / "model.safetensors", {"format": "pt"})
        with pytest.raises(VerificationFailed):
            verify_export(bad, run)
    assert "verified" in verify_export(good, run)


@pytest.mark.slow
def test_an_identity_adapter_fails_verification(runs: dict[str, Path], tmp_path: Path) -> None:
    run, dest = runs["zero3_lora"], tmp_path / "adapter"
    assert export(str(run), "--out", str(dest), "--no-verify").returncode == 0
    sd = load_file(dest / "adapter_model.safetensors")
    save_file(
        {k: v * 0 if "lora_B" in k else v for k, v in sd.items()},
        dest / "adapter_model.safetensors",
    )
    with pytest.raises(VerificationFailed, match="identity"):
        verify_export(dest, run)


@pytest.mark.slow
def test_corrupted_checkpoint_is_one_line_exit_2(
    trained: dict[str, TrainedRun], tmp_path: Path
) -> None:
    src = trained["zero3_full"]
    run = tmp_path / "run"
    shutil.copytree(src.out, run, ignore=shutil.ignore_patterns("ray", "final", "report*"))
    ckpt = run / "checkpoints" / src.latest_checkpoint().name
    shard = ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    dest = tmp_path / "out"
    proc = export(str(run), "--out", str(dest))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not match its hash (corrupted)" in errors[0], proc.stderr
    assert not dest.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.slow
def test_bad_export_arguments_are_one_line_errors(runs: dict[str, Path], tmp_path: Path) -> None:
    """In process (the CLI's exit 2 for a UserError is covered by the corrupted case)."""
    run = runs["zero2_full"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases: list[tuple[Path, Path, dict[str, Any], str]] = [
        (run, tmp_path / "full", {}, "exists and is not empty"),
        (run, tmp_path / "a", {"dtype": "int8"}, "--dtype"),
        (run, tmp_path / "b", {"merge_lora": True}, "--merge-lora"),
        (run, tmp_path / "c", {"max_shard_size": "lots"}, "--max-shard-size"),
        (tmp_path, tmp_path / "d", {}, "not a run directory"),
    ]
    for source, dest, kwargs, needle in cases:
        with pytest.raises(UserError, match=needle) as e:
            export_checkpoint(source, dest, **kwargs)
        assert "\n" not in str(e.value)
        assert not dest.exists() or dest.name == "full"


def test_plan_shards_and_sizes() -> None:
    assert plan_shards([4, 4, 4], 8) == [[0, 1], [2]]
    assert plan_shards([10, 1, 1], 8) == [[0], [1, 2]]  # an oversize tensor stands alone
    assert plan_shards([], 8) == []
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("200KB") == 200_000 and parse_size("1234") == 1234


@pytest.mark.slow
def test_offline_reshard_converts_once_and_refuses_a_corrupted_checkpoint(
    trained: dict[str, TrainedRun], tmp_path: Path
) -> None:
    """`distft reshard RUN`: the newest checkpoint of a 2-worker ZeRO-2 run, converted with
    one process per core into `.universal/` (its manifest checked by the loader's own
    check); a second call finds it ready; a corrupted checkpoint is one line, exit 2."""
    from distft.checkpoint.reshard import check_universal

    src = trained["zero2_full"]
    run = tmp_path / "run"
    shutil.copytree(src.out, run, ignore=shutil.ignore_patterns("ray", "final", "report*"))
    ckpt = run / "checkpoints" / src.latest_checkpoint().name
    first = run_cli("reshard", str(run))
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"reshard: {ckpt.name} (saved by 2 workers) converted to a universal" in first.stdout
    universal = ckpt.parent / ".universal" / ckpt.name
    assert check_universal(universal, ckpt) is None and (universal / "zero").is_dir()
    again = run_cli("reshard", str(ckpt))
    assert again.returncode == 0 and "is ready (converted before)" in again.stdout, again.stdout

    shutil.rmtree(universal)
    shard = ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = run_cli("reshard", str(run))
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert len(errors) == 1 and "does not match its hash (corrupted)" in errors[0], errors
    assert not universal.exists()
