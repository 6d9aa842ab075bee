"""`distft plan`: model states equal what real DeepSpeed engines allocate, activations
match the bytes real models save for backward, and the command answers every example."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from distft.archs import FAMILIES
from distft.assets import TinyAssets
from distft.cli import app
from distft.data.batch import Targets
from distft.objectives import output_head, rows_of
from distft.plan.activations import activations, materialised_mask
from distft.plan.shape import dims_of

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "tests" / "fixtures" / "plan_models"  # real config.json of the examples
EXAMPLE_MODELS = {
    "llama3_70b_full_zero3_32gpu.yaml": "llama3_70b",
    "llama3_8b_lora_1gpu.yaml": "llama3_8b",
    "llama3_8b_dpo_lora_1gpu.yaml": "llama3_8b",
    "llama3_8b_reward_lora_1gpu.yaml": "llama3_8b",
    "llama3_70b_dpo_zero3_32gpu.yaml": "llama3_70b",
    "mistral_7b_full_zero2_8gpu.yaml": "mistral_7b",
    "qwen_7b_lora_zero3_offload.yaml": "qwen2_5_7b",
}


# ----------------------------------------------------------------------------- model states


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_model_states_equal_what_deepspeed_allocates() -> None:
    """One 2-rank gloo launch (tests/plan_ranks.py) builds a real engine for each ZeRO
    stage, offload and LoRA case and reads its flat partitions back. Element counts are
    integers computed by the same rules DeepSpeed applies, so they must be equal."""
    port, procs = str(_port()), []
    for rank in (0, 1):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            PYTHONPATH=str(REPO),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "plan_ranks.py")],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:  # only the ranks this test started
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    line = next(ln for ln in outputs[0].splitlines() if ln.startswith("RESULT "))
    results = json.loads(line.removeprefix("RESULT "))
    assert len(results) == 11
    for r in results:
        measured = {k: v for k, v in r["measured"].items() if v is not None}
        assert measured == {k: r["planned"][k] for k in measured}, r["case"]
    # the padding rules were exercised: the odd-sized params padded under ZeRO 1/2 and 3
    by_stage = {r["case"]["zero_stage"]: r["planned"] for r in results if not r["case"]["lora"]}
    assert by_stage[1]["weights"] != by_stage[0]["weights"]
    assert by_stage[3]["weights"] * 2 != by_stage[0]["weights"]
    assert any(r["measured"]["grads"] is not None for r in results)


# ----------------------------------------------------------------------------- activations


def saved_bytes(family: str, seq: int, attention: str, checkpointing: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward over one forward and
    the loss (distft.objectives.head: the head on target rows), parameters excluded: the
    activations a rank holds when backward starts."""
    config = FAMILIES[family]()
    config.vocab_size = 518
    if getattr(config, "pad_token_id", None) is not None:  # Phi-3's 32000 is past 518
        config.pad_token_id = 0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.bfloat16, attn_implementation=attention
    )
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 518, (1, seq))
    every = Targets((1, seq), torch.arange(seq), ids.view(-1), 0)  # every position a target
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with rows_of(output_head(model), every):
            logits = model(input_ids=ids).logits
        F.cross_entropy(logits.float(), every.tokens, reduction="sum")
    return sum(seen.values())


@pytest.mark.parametrize(
    ("family", "seq", "attention", "checkpointing"),
    [
        ("llama", 256, "sdpa", False),
        ("llama", 4096, "sdpa", False),
        ("llama", 1024, "eager", False),  # the n x n softmax
        ("llama", 4096, "sdpa", True),
        ("qwen2", 2048, "sdpa", False),
        ("qwen3", 4096, "sdpa", False),  # q/k norms
        ("mistral", 1024, "sdpa", False),  # sliding window: a materialised mask
        ("mixtral", 512, "sdpa", False),  # routed experts
        ("qwen2_moe", 2048, "sdpa", False),  # routed + shared expert
        ("gemma2", 1024, "eager", False),  # soft-capped scores and logits, 4 norms a layer
        ("gemma3", 1024, "sdpa", False),  # q/k norms, sliding and full layers
        ("phi3", 2048, "sdpa", False),  # fused qkv and gate/up projections
        ("gpt_neox", 2048, "sdpa", False),  # LayerNorm, plain MLP, partial rotary
    ],
)
def test_activations_within_15_percent_of_saved(
    family: str, seq: int, attention: str, checkpointing: bool
) -> None:
    config = FAMILIES[family]()
    config.vocab_size = 518
    planned = activations(
        dims_of(config),
        e=2,
        attention=attention,
        seq=seq,
        micro_batch=1,
        checkpointing=checkpointing,
        masked=materialised_mask(config, attention, packed=False),
    ).held
    measured = saved_bytes(family, seq, attention, checkpointing)
    # 15%: the bound; dense families match to the byte, MoE within ~10% (the
    # router's index bookkeeping is counted approximately)
    assert abs(planned - measured) <= 0.15 * measured, (planned, measured)


def test_loss_chunk_and_sequence_parallel_shrink_their_terms() -> None:
    d = dims_of(FAMILIES["llama"]())
    base = activations(d, e=2, attention="sdpa", seq=4096, micro_batch=1, checkpointing=True)
    chunked = activations(
        d, e=2, attention="sdpa", seq=4096, micro_batch=1, checkpointing=True, loss_chunk_size=512
    )
    sp = activations(
        d, e=2, attention="sdpa", seq=4096, micro_batch=1, checkpointing=True, sequence_parallel=4
    )
    # 4096 rows at once: 16-bit logits + fp32 copy; chunked: 512 rows of logits, fp32 copy
    # and softmax at a time
    assert chunked.loss_transient * 8 * (2 + 4) == base.loss_transient * (2 + 8)
    assert chunked.loss_held < base.loss_held  # weight- and row-sized gradients, no logits
    assert sp.layers * 4 == base.layers  # a quarter of the tokens per rank


def test_chunked_loss_bytes_equal_the_h200_measurement() -> None:
    """bench/loss_memory.py on an H200 (BENCHMARKS.md, *Chunked loss*): 2.236 GiB above
    the inputs for 4096 target rows, vocabulary 128,256, hidden 4096, bf16, chunk 1024."""
    d = replace(dims_of(FAMILIES["llama"]()), hidden=4096, vocab=128256)
    a = activations(d, e=2, attention="sdpa", seq=4096, micro_batch=1, checkpointing=True,
                    loss_chunk_size=1024)  # fmt: skip
    # 5%: the bench's figure includes the allocator's rounding of ~20 tensors
    assert abs((a.loss_held + a.loss_transient) / 2**30 - 2.236) <= 0.05 * 2.236


# ----------------------------------------------------------------------------- the command


def plan_cli(*args: str) -> Any:
    return CliRunner().invoke(app, ["plan", *args])


@pytest.mark.parametrize("example", sorted(EXAMPLE_MODELS))
def test_every_big_example_gets_an_answer(example: str) -> None:
    model = MODELS / EXAMPLE_MODELS[example]
    result = plan_cli(
        f"examples/{example}",
        f"model.name_or_path={model}",
        "model.tokenizer=null",
        "--gpu-memory",
        "80GiB",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["device_total_bytes"] == sum(report["device_bytes"].values())
    if example.startswith("llama3_70b"):
        # HF's Llama-3.1-70B: 80 x 855,654,400 + 2 x 128256 x 8192 embeddings + final norm
        assert report["params"] == 70_553_706_496
        assert report["fits"]  # ~16 bytes/param / 32 ranks + activations < 80 GiB
        assert report["deepspeed_estimate_bytes"] is not None
    assert report["activations_calibrated"]  # Llama, Mistral, Qwen2: measured families


def test_an_uncalibrated_family_is_said(tiny: TinyAssets, tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=518).save_pretrained(tmp_path)
    result = plan_cli("examples/tiny_demo.yaml", f"model.name_or_path={tmp_path}",
                      "model.tokenizer=null", f"data.train_files=[{tiny.train_file}]",
                      "data.eval_sets={}")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "activations: gpt2 is counted as a Llama-style decoder, not calibrated" in (
        result.stdout
    )


TINY = ["tiny_demo.yaml", "tiny_demo_lora.yaml", "tiny_packed.yaml", "tiny_pretrain.yaml"]


@pytest.mark.parametrize("example", TINY)
def test_every_tiny_example_gets_an_answer(
    example: str, tiny: TinyAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in the repo after `make demo`: .cache/tiny and .cache/tiny_pretrain/final."""
    (tmp_path / ".cache" / "tiny_pretrain").mkdir(parents=True)
    (tmp_path / ".cache" / "tiny").symlink_to(tiny.root)
    (tmp_path / ".cache" / "tiny_pretrain" / "final").symlink_to(tiny.model_dir)
    monkeypatch.chdir(tmp_path)
    result = plan_cli(str(REPO / "examples" / example))
    assert result.exit_code == 0, result.output
    assert "device total" in result.stdout and "host total" in result.stdout


def test_too_small_gpu_gets_a_change_that_fits() -> None:
    model = MODELS / "mistral_7b"
    args = [
        "examples/mistral_7b_full_zero2_8gpu.yaml",
        f"model.name_or_path={model}",
        "model.tokenizer=null",
    ]
    small = plan_cli(*args, "--gpu-memory", "24GiB")
    assert small.exit_code == 0, small.output
    assert "does not fit: --gpu-memory 24.00 GiB" in small.stdout
    proposed = next(ln for ln in small.stdout.splitlines() if ln.startswith("proposed: "))
    overrides = proposed.removeprefix("proposed: ").split(" -> ")[0].split()
    assert overrides
    # a GPU-only change (ZeRO-3; with the chunked loss's small loss buffers no smaller
    # micro batch is needed) fits 24 GiB and is cheaper than moving the optimizer to the host
    assert not any("offload" in o for o in overrides), overrides
    assert "deepspeed.zero_stage=3" in overrides
    if any(o.startswith("batch.micro_batch_size=") for o in overrides):  # global batch kept
        assert any(o.startswith("batch.grad_accum=") for o in overrides), overrides
    again = plan_cli(*args, *overrides, "--gpu-memory", "24GiB", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["fits"] is True


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--gpu-memory", "lots"], "error: --gpu-memory: expected a size like 5GB, 80GiB"),
        (["optim.lrr=1"], "error: optim.lrr: unknown key"),
        (
            ["model.name_or_path=nobody/not-a-cached-model"],
            "error: model.name_or_path: cannot read",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], needle: str) -> None:
    model = MODELS / "llama3_8b"
    result = plan_cli("examples/llama3_8b_lora_1gpu.yaml", f"model.name_or_path={model}", *args)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(needle), result.stderr
    assert "Traceback" not in result.output


def test_table_names_every_figure_and_deepspeeds_estimate() -> None:
    t0 = time.perf_counter()
    model = MODELS / "qwen2_5_7b"
    result = plan_cli(
        "examples/qwen_7b_lora_zero3_offload.yaml",
        f"model.name_or_path={model}",
        "model.tokenizer=null",
    )
    assert result.exit_code == 0, result.output
    for row in (
        "weights (partition)",
        "AdamW moments",
        "activations",
        "loss buffers",
        "reduce bucket",
        "host total",
        "DeepSpeed's estimate",
    ):
        assert row in result.stdout, row
    # offload_param + offload_optimizer: the partitions and optimizer states are on the host
    host_rows = [ln for ln in result.stdout.splitlines() if ln.startswith("  host")]
    assert any("weights (partition)" in ln for ln in host_rows)
    assert any("AdamW moments" in ln for ln in host_rows)
    assert time.perf_counter() - t0 < 120


def test_train_start_line_is_the_plans_summary(
    tiny: TinyAssets, capsys: pytest.CaptureFixture[str]
) -> None:
    """What `distft train` prints before Ray starts (cli._print_plan_summary)."""
    from distft import cli
    from distft.config import from_dict

    cfg = from_dict(
        {
            "model": {"name_or_path": str(tiny.model_dir)},
            "data": {"train_files": [str(tiny.train_file)]},
            "checkpoint": {"output_dir": "out"},
        }
    )
    cli._print_plan_summary(cfg)
    line = capsys.readouterr().err.strip()
    assert line.startswith("plan: ") and "GiB per rank" in line, line
    missing = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"name_or_path": "nobody/absent"})}
    )
    cli._print_plan_summary(missing)  # never a reason not to train
    assert capsys.readouterr().err.startswith("plan: not available (")


def test_quantised_base_weights_are_about_half_a_byte_per_param() -> None:
    """QLoRA's planner side (its config key comes with QLoRA): 4-bit linear weights,
    embeddings and head in 16 bits."""
    from distft.config import from_dict
    from distft.plan import make_plan

    cfg = from_dict(
        {
            "model": {"name_or_path": str(MODELS / "llama3_8b")},
            "data": {"train_files": [str(REPO / "examples/data/sample_chat.jsonl")]},
            "checkpoint": {"output_dir": "out"},
            "lora": {"enabled": True},
        }
    )
    plan = make_plan(cfg, quant_bits=4)
    quantised = plan.states.device["weights (4-bit base)"]
    shape = plan.shape
    embeddings = sum(p.numel for p in shape.params if "embed" in p.name or "lm_head" in p.name)
    linear = sum(p.numel for p in shape.params if not p.trainable and p.ndim >= 2) - embeddings
    # bitsandbytes' nf4 with double quant (distft.quant, checked against what bitsandbytes
    # allocates in test_adapters_variants): 0.5 byte + an 8-bit absmax per 64 weights + an
    # fp32 scale per 256 absmaxes; 2 bytes for the rest. Within the rounding of each tensor
    from distft.quant import bytes_per_param

    expected = linear * bytes_per_param() + 2 * (shape.total - linear)
    assert abs(quantised - expected) <= 4 * len(shape.params)


# ----------------------------------------------------------------------------- auto batch


def _tiny_cfg(tiny: TinyAssets, **batch: Any) -> Any:
    from distft.config import from_dict

    return from_dict(
        {
            "model": {"name_or_path": str(tiny.model_dir)},
            "data": {"train_files": [str(tiny.train_file)], "max_seq_len": 1024},
            "checkpoint": {"output_dir": "out"},
            "batch": batch,
        }
    )


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (0, "batch.micro_batch_size: must be > 0 or 'auto' (got 0)"),
        ("big", "batch.micro_batch_size"),
    ],
)
def test_micro_batch_size_takes_a_number_or_auto(value: Any, needle: str, tiny: TinyAssets) -> None:
    from distft.config import ConfigError

    assert _tiny_cfg(tiny, micro_batch_size="auto").batch.micro_batch_size == "auto"
    with pytest.raises(ConfigError) as e:
        _tiny_cfg(tiny, micro_batch_size=value)
    assert str(e.value).startswith(needle), str(e.value)


def test_auto_micro_batch_is_the_largest_that_fits(tiny: TinyAssets, tmp_path: Path) -> None:
    """Given just the memory that micro batch 4 needs, auto picks 4 (8 would not fit);
    train writes the number into config.yaml (cli._resolve_auto_batch, then save_resolved,
    in the order `distft train` runs them)."""
    import yaml

    from distft import cli
    from distft.config import save_resolved
    from distft.plan import make_plan
    from distft.plan.auto import resolve_auto, with_micro

    cfg = _tiny_cfg(tiny, micro_batch_size="auto", grad_accum=2)
    need4 = make_plan(with_micro(cfg, 4)).device_total
    assert make_plan(with_micro(cfg, 8)).device_total > need4
    resolved, line = resolve_auto(cfg, need4)
    assert resolved.batch.micro_batch_size == 4 and resolved.batch.grad_accum == 2
    assert line is not None and line.startswith("batch.micro_batch_size: auto -> 4 (")
    save_resolved(cfg, tmp_path / "auto.yaml")  # `auto` as a user writes it
    result = plan_cli(str(tmp_path / "auto.yaml"), "--gpu-memory", str(need4), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["micro_batch_size"] == 4
    # CPU workers: this host's RAM shared by the workers; a number in config.yaml
    train_cfg = cli._resolve_auto_batch(cfg)
    assert isinstance(train_cfg.batch.micro_batch_size, int)
    save_resolved(train_cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["batch"]["micro_batch_size"] == train_cfg.batch.micro_batch_size


@pytest.mark.parametrize("stage", [2, 3])
def test_a_resident_dpo_reference_is_counted(stage: int) -> None:
    """A resident frozen copy (full fine-tuning) holds as many bytes as the trained
    weights, its own partition under ZeRO-3; precomputed, or under LoRA (the base with the
    adapters off), it holds nothing."""
    from distft.config import from_dict
    from distft.plan import make_plan

    def plan(reference: str, lora: bool = False):  # type: ignore[no-untyped-def]
        return make_plan(
            from_dict(
                {
                    "model": {"name_or_path": str(MODELS / "llama3_8b")},
                    "data": {
                        "train_files": [str(REPO / "examples/data/sample_preference.jsonl")],
                        "format": "preference",
                    },
                    "checkpoint": {"output_dir": "out"},
                    "objective": {"method": "dpo", "dpo": {"reference": reference}},
                    "deepspeed": {"zero_stage": stage},
                    "cluster": {"num_workers": 8},
                    "lora": {"enabled": lora},
                }
            )  # fmt: skip
        )

    resident, precomputed = plan("resident"), plan("precomputed")
    row = "DPO reference (resident frozen copy)"
    weights = "weights" if stage < 3 else "weights (partition)"
    held = precomputed.device[weights] + precomputed.device.get(
        "weights (persistent small params)", 0
    )
    assert resident.device[row] == held > 0
    assert resident.device_total - precomputed.device_total == held
    assert row not in precomputed.device and row not in plan("resident", lora=True).device
