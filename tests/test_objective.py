"""The objective computes the LM head for target positions only; loss and gradients must
be those of the plain full-logits cross-entropy, for a full model, a tied-embedding model
and a PEFT (LoRA) model, and the hook must be gone afterwards."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from distft.data import IGNORE, collate
from distft.objectives import nll_sum, output_head
from distft.tolerance import Kind, assert_close


def llama(tied: bool) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(config).float()


def batch() -> Any:
    g = torch.Generator().manual_seed(1)
    rows = []
    for n, prompt in [(9, 5), (6, 2), (12, 11)]:
        ids = torch.randint(3, 97, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return collate(rows, pad_id=0)


def reference(model: Any, b: Any) -> torch.Tensor:
    logits = model(input_ids=b.input_ids).logits[:, :-1]
    targets = b.labels[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
        reduction="sum",
    )  # fmt: skip


def grads(model: Any) -> torch.Tensor:
    out = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("kind", ["full", "tied", "lora"])
def test_target_rows_only_give_the_full_loss_and_gradients(kind: str) -> None:
    model = llama(tied=kind == "tied")
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # non-zero B, so the adapters change the logits
                torch.nn.init.normal_(p, std=0.1)
    b = batch()
    head = output_head(model)
    assert isinstance(head, torch.nn.Linear)
    calls: list[tuple[int, ...]] = []
    spy = head.register_forward_hook(lambda _m, _a, out: calls.append(tuple(out.shape)))
    ours = nll_sum(model, b)
    spy.remove()
    ours.backward()
    ours_grads = grads(model)
    targets = int((b.labels[:, 1:] != IGNORE).sum())
    assert calls == [(targets, 97)]  # the head ran on the target positions alone
    assert not head._forward_pre_hooks  # the selection hook is gone
    ref = reference(model, b)
    ref.backward()
    # the head on the target rows alone vs on every row: other matmul shapes, so other
    # blocking of the same dot products (reassociated); gradients relative to their size
    assert_close(ours.item(), ref.item(), torch.float32, Kind.REASSOCIATED, "loss")
    want = grads(model)
    scale = float(want.abs().max())
    assert_close(ours_grads, want, torch.float32, Kind.REASSOCIATED, "grads", scale)
    # outside the objective, the model's logits are untouched
    assert model(input_ids=b.input_ids).logits.shape == (*b.input_ids.shape, 97)


def test_a_model_without_output_embeddings_gets_the_full_logits_path() -> None:
    class Bare(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = llama(tied=False)

        def forward(self, **kw: Any) -> Any:
            return self.inner(**kw)

    model = Bare()
    assert output_head(model) is None
    b = batch()
    got, want = nll_sum(model, b).item(), reference(model, b).item()
    assert_close(got, want, torch.float32, Kind.REASSOCIATED, "loss")
