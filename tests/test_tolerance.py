"""The tolerance rule (`distft.tolerance`): bounds scale with the dtype and the magnitude,
admit what rounding does (a merged LoRA adapter, other thread counts) and refuse what a
bug does (one weight matrix scaled by 1.001)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from distft.tolerance import Kind, bound, scale_of, within


def test_bounds_scale_with_the_dtype_and_the_magnitude() -> None:
    for kind in Kind:
        assert bound(1.0, torch.float32, kind) < bound(1.0, torch.bfloat16, kind)
        assert bound(100.0, torch.float32, kind) == pytest.approx(
            100 * bound(1.0, torch.float32, kind)
        )
        assert bound(1e-3, torch.float32, kind) == bound(1.0, torch.float32, kind)  # floor 1
    assert scale_of([torch.tensor([-3.0, 2.0]), 0.5]) == 3.0
    assert bound(1.0, torch.float32, Kind.RECOMPUTED) < bound(1.0, torch.float32, Kind.REASSOCIATED)
    assert bound(1.0, torch.float32, Kind.RECOMPUTED, scale=1e-3) < bound(
        1.0, torch.float32, Kind.RECOMPUTED
    )


def test_nan_is_never_within() -> None:
    ok, worst, _ = within(torch.tensor([float("nan")]), torch.tensor([1.0]), torch.float32,
                          Kind.REASSOCIATED)  # fmt: skip
    assert not ok and worst != worst
    assert not within(float("nan"), 1.0, torch.float32, Kind.ROUNDED)[0]


def _merge_gap(model_dir: Any, adapter_std: float, threads: int) -> tuple[float, float, float]:
    """(max |merged - unmerged|, reassociated bound, |Δ| from scaling one matrix by 1.001)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
        model = get_peft_model(base, lora).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, adapter_std)
            ids = torch.randint(0, 500, (1, 64))
            want = model(input_ids=ids).logits
            merged = model.merge_and_unload()
            got = merged(input_ids=ids).logits
            merged.model.layers[1].mlp.down_proj.weight.mul_(1.001)
            tampered = merged(input_ids=ids).logits
    finally:
        torch.set_num_threads(before)
    tol = bound(want, torch.float32, Kind.REASSOCIATED)
    return float((got - want).abs().max()), tol, float((tampered - got).abs().max())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("adapter_std", [0.02, 0.2])
def test_a_merged_adapter_is_within_and_a_changed_weight_is_not(
    tiny: Any, adapter_std: float, threads: int
) -> None:
    gap, tol, tampered = _merge_gap(tiny.model_dir, adapter_std, threads)
    assert gap <= tol, (gap, tol)
    # the recomputed bound (what `distft export` applies to exact copies) catches a
    # matrix scaled by 1.001 with room to spare
    assert tampered > 3 * bound(1.0, torch.float32, Kind.RECOMPUTED), tampered
