"""DoRA, rsLoRA and QLoRA in process, no Ray: their config checks (one line naming the key),
what peft builds for them on the tiny Llama (distft/assets.py), the BitsAndBytesConfig the
run derives, and the 4-bit sizes the planner counts, checked against the bytes
bitsandbytes actually allocates. The bitsandbytes tests run where it is installed (the
`qlora` extra, in `dev`); the training runs are in test_adapters_variants_e2e.py."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import pytest
import torch

from distft import quant
from distft.config import ConfigError
from distft.export.hf_folder import base_model, lora_names
from distft.lora import with_lora
from distft.model import build_model
from tests.test_adapters import lora, make_cfg

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed")


def refused(tiny: Any, **sections: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        make_cfg(tiny, **sections)
    return info.value.problems


@pytest.mark.parametrize("key", ["use_dora", "use_rslora", "quantize_base"])
def test_variants_need_lora(tiny: Any, key: str) -> None:
    value: Any = "nf4" if key == "quantize_base" else True
    problems = refused(tiny, lora={key: value})
    assert any(p.startswith(f"lora.{key}: needs lora.enabled: true") for p in problems)


def test_quantised_base_refusals(tiny: Any) -> None:
    stage3_offload = {"zero_stage": 3, "offload_param": "cpu", "precision": "bf16"}
    problems = refused(tiny, lora=lora(quantize_base="nf4"), deepspeed=stage3_offload)
    assert any(
        "offload_param: 'cpu'" in p and p.startswith("lora.quantize_base:") for p in problems
    )
    # the packed weights are stored in the training dtype: a different load dtype would be cast
    problems = refused(
        tiny,
        lora=lora(quantize_base="fp4"),
        model={"name_or_path": str(tiny.model_dir), "dtype": "fp32"},
        deepspeed={"precision": "bf16"},
    )
    assert any("model.dtype fp32 differs from deepspeed.precision bf16" in p for p in problems)
    # peft's DoRA replaces a CPU worker's 4-bit weight at every forward (seen: DeepSpeed's
    # "failed to find frozen ... in named params" when checkpointing)
    problems = refused(tiny, lora=lora(quantize_base="nf4", use_dora=True))
    assert any(p.startswith("lora.use_dora: not with lora.quantize_base on CPU") for p in problems)
    if HAVE_BNB:  # GPU workers take DoRA on a 4-bit base
        gpu = {"gpus_per_worker": 1}
        assert make_cfg(tiny, lora=lora(quantize_base="nf4", use_dora=True), cluster=gpu)


def test_missing_bitsandbytes_is_one_line(tiny: Any) -> None:
    """Where bitsandbytes is absent the run is refused before Ray with the install line;
    where it is present the same config is accepted."""
    if HAVE_BNB:
        assert make_cfg(tiny, lora=lora(quantize_base="nf4")).lora.quantize_base == "nf4"
    else:
        problems = refused(tiny, lora=lora(quantize_base="nf4"))
        assert "pip install 'distft[qlora]'" in "\n".join(problems)


@pytest.mark.parametrize("rslora", [False, True])
def test_rslora_scaling(tiny: Any, rslora: bool) -> None:
    """rsLoRA scales the adapter by alpha/sqrt(r) (Kalajdzievski 2023), LoRA by alpha/r.
    Exact: both are one Python float division, computed the same way here."""
    cfg = make_cfg(tiny, lora=lora(r=16, alpha=8, use_rslora=rslora))
    model = build_model(cfg, {})
    scalings = {m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A")}
    assert scalings == {8 / math.sqrt(16) if rslora else 8 / 16}


def test_dora_adds_a_magnitude_per_output_row(tiny: Any) -> None:
    """DoRA: one trained magnitude per output row of every adapted layer, initialised to
    the row norms of the base weight (B = 0, so W + s·B·A = W)."""
    model = build_model(make_cfg(tiny, lora=lora(use_dora=True)), {})
    names = lora_names(model)
    mags = [n for n in names if "lora_magnitude_vector" in n]
    adapted = [n for n in names if n.endswith("lora_A.default.weight")]
    assert len(mags) == len(adapted) > 0
    params = dict(model.named_parameters())
    for name in mags:
        layer = name.split(".lora_magnitude_vector")[0]
        weight = params[f"{layer}.base_layer.weight"]
        # Exact: peft computes the same torch.linalg.norm over the same rows of W
        assert torch.equal(params[name], torch.linalg.norm(weight, dim=1))


def test_bytes_per_param() -> None:
    # 4 bits + one 8-bit scale per 64 weights + one fp32 per 256 scales (exact in binary)
    assert quant.bytes_per_param() == 0.5 + 1 / 64 + 4 / (64 * 256)
    assert quant.bytes_per_param(double_quant=False) == 0.5 + 4 / 64
    assert quant.quantized_bytes(1_000_000) == math.ceil(1_000_000 * quant.bytes_per_param())


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_bnb_config_is_derived(tiny: Any, precision: str, dtype: torch.dtype) -> None:
    if not HAVE_BNB:
        pytest.skip("BitsAndBytesConfig checks that bitsandbytes is installed")
    cfg = make_cfg(tiny, lora=lora(quantize_base="fp4"), deepspeed={"precision": precision})
    q = quant.bnb_config(cfg, dtype)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "fp4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == dtype and q.bnb_4bit_quant_storage == dtype
    assert quant.bnb_config(make_cfg(tiny, lora=lora()), dtype) is None


@needs_bnb
@pytest.mark.parametrize("double", [True, False])
def test_quantized_bytes_match_bitsandbytes(double: bool) -> None:
    """What the planner counts is what bitsandbytes allocates for a 4-bit weight: packed
    data, scales and (double quantisation) the scales' scales, within the per-tensor extras
    the count leaves out (code book, offset: < 100 bytes)."""
    import bitsandbytes.functional as F

    weight = torch.randn(512, 1024, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=double)
    held = packed.nbytes + state.absmax.nbytes
    if double:
        held += state.state2.absmax.nbytes
    assert 0 <= held - quant.quantized_bytes(weight.numel(), double) < 100


@needs_bnb
def test_qlora_model_on_cpu(tiny: Any) -> None:
    """The 4-bit base the workers build: every linear layer but the head is bitsandbytes'
    Linear4bit stored in the training dtype; LoRA sits on top and only its weights get
    gradients; the export's reload of the trained base (`hf_folder.base_model`) quantises
    to the same bytes (the adapter's logits check depends on it)."""
    import bitsandbytes as bnb

    cfg = make_cfg(tiny, lora=lora(quantize_base="nf4"), deepspeed={"precision": "bf16"})
    model = build_model(cfg, {})
    quantised = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    assert all(m.weight.dtype == torch.bfloat16 for m in quantised)  # quant storage
    assert not isinstance(model.get_output_embeddings(), bnb.nn.Linear4bit)
    ids = torch.randint(0, 256, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(lora_names(model))
    model.eval()
    with torch.no_grad():  # an eval-mode forward without gradients, as evaluation runs:
        model(input_ids=ids)  # bitsandbytes' AVX512-BF16 path would repack in place here
    again = with_lora(base_model(cfg, trained=True), cfg)  # as quantised, never run
    mine = {n: p for n, p in model.named_parameters() if ".base_layer." in n}
    theirs = dict(again.named_parameters())
    # Exact: the same bf16 weights quantised by the same deterministic kernel. Compared as
    # bytes: packed 4-bit codes read as bf16 can be NaN patterns, which never compare equal
    assert all(
        torch.equal(p.view(torch.uint8), theirs[n].view(torch.uint8)) for n, p in mine.items()
    )
    assert all(
        torch.equal(p.quant_state.absmax, theirs[n].quant_state.absmax) for n, p in mine.items()
    )


@needs_bnb
def test_qlora_state_dict_reloads_strictly(tiny: Any) -> None:
    """Resume: the engine reloads the module's own state dict strictly. A 4-bit base adds
    its quant state as extra entries, which the model built for a run drops on load (its
    base is rebuilt identically); the trained weights still load, and a missing one still
    fails."""
    cfg = make_cfg(tiny, lora=lora(quantize_base="nf4"), deepspeed={"precision": "bf16"})
    model = build_model(cfg, {})
    state = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    extra = {k for k in state if k not in params and not k.endswith("inv_freq")}
    assert extra and all(quant._is_quant_state(k) for k in extra)
    assert not any(quant._is_quant_state(k) for k in params)
    trained = {k: torch.full_like(v, 0.5) for k, v in state.items() if k in lora_names(model)}
    model.load_state_dict({**state, **trained}, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    missing = {k: v for k, v in state.items() if k != next(iter(trained))}
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(missing, strict=True)
