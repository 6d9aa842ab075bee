"""The chunked LM head + cross-entropy (`distft.objectives.chunked_ce`, `nll_sum(..., chunk)`) gives
the loss and gradients of the unchunked computation: the function alone (untied, tied,
bias, soft-capping, frozen head), real tiny models of several families through
`nll_sum`, the fallback for heads and models it does not take, and a real ZeRO-3 engine.

Tolerance of the function-level comparisons, fp32: |Δ| <= 1e-6 * max|reference|. Each
logit is the same length-d dot product in both computations (chunks split the rows, not
the reduction), so logits agree to an ulp or two; the loss and the weight/bias gradients
are sums over rows, grouped by chunk instead of in one go, which reassociates them: a few
ulps of the largest term (measured: up to 4e-7 relative). 1e-6 is about 8 fp32 ulps."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from distft.archs import FAMILIES
from distft.data import IGNORE, collate
from distft.objectives import head_plan, nll_sum, output_head
from distft.objectives.chunked_ce import Epilogue, chunked_nll_sum
from distft.tolerance import Kind, assert_close
from tests.test_engine_config import _run_child

REL = 1e-6  # see the module docstring
V, D, N = 101, 16, 37


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = float(want.abs().max())
    worst = float((got - want).abs().max())
    assert worst <= REL * scale, f"{what}: max |Δ| {worst:.3g} > {REL * scale:.3g}"


def unchunked(h: Any, w: Any, b: Any, t: Any, cap: float | None) -> torch.Tensor:
    z = F.linear(h, w, b).float()
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return F.cross_entropy(z, t, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 5, 16, N, 100])  # 5, 16: do not divide N
@pytest.mark.parametrize("head", ["untied", "tied", "bias", "softcap", "frozen"])
def test_function_equals_unchunked(chunk: int, head: str) -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(V, D, generator=g).requires_grad_()
    ids = torch.randint(0, V, (N,), generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    own = torch.randn(V, D, generator=g).requires_grad_(head != "frozen")
    bias = torch.randn(V, generator=g).requires_grad_() if head == "bias" else None
    cap = 3.0 if head == "softcap" else None  # small cap: tanh far from linear

    def run(fn: Any) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        h = emb[ids]  # the hidden states are embedding rows (tied: rows of W too)
        w = emb if head == "tied" else own
        loss = fn(h, w, bias, t)
        leaves = [emb] + ([own] if head != "tied" else []) + ([bias] if bias is not None else [])
        wanted = [x for x in leaves if x.requires_grad]
        grads = torch.autograd.grad(loss, wanted)
        return loss.detach(), list(grads)

    ours, ours_g = run(lambda h, w, b, t: chunked_nll_sum(h, w, b, t, chunk, Epilogue(softcap=cap)))
    want, want_g = run(lambda h, w, b, t: unchunked(h, w, b, t, cap))
    close(ours, want, "loss")
    assert len(ours_g) == len(want_g) == (1 if head in ("tied", "frozen") else 2) + (head == "bias")
    for i, (a, b) in enumerate(zip(ours_g, want_g, strict=True)):
        assert a is not None and b is not None
        close(a, b, f"grad {i}")


def test_frozen_weight_gets_no_gradient_and_bad_chunk_is_refused() -> None:
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D)  # requires_grad False: a frozen head
    chunked_nll_sum(h, w, None, torch.randint(0, V, (N,)), 8).backward()
    assert h.grad is not None and w.grad is None
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        chunked_nll_sum(h, w, None, torch.zeros(N, dtype=torch.long), 0)


def test_epilogue_scales_and_cap_match_autograd() -> None:
    x = torch.randn(9, V, dtype=torch.float64, requires_grad=True)
    ep = Epilogue(multiply=0.7, divide=1.3, softcap=2.0)
    z, t = ep.apply(x)
    dz = torch.randn_like(z)
    (want,) = torch.autograd.grad(z, x, dz)
    got = ep.backward(dz.clone(), t)
    # the hand-written chain rule vs autograd's (fp64, then fp32 as the epilogue computes):
    # equal expressions evaluated in another order, bounded by fp32 at their magnitude
    scale = float(want.abs().max())
    assert_close(got, want.float(), torch.float32, Kind.REASSOCIATED, "d epilogue", scale)
    cap = 2.0 * torch.tanh(x.detach().float() * 0.7 / 1.3 / 2.0)
    assert_close(z, cap, torch.float32, Kind.REASSOCIATED, "epilogue", 2.0)  # |z| <= cap


# ------------------------------------------------------------------ tiny models


def tiny(family: str, seed: int = 0) -> Any:
    from transformers import AutoModelForCausalLM

    config = FAMILIES[family]()
    config.vocab_size, config.pad_token_id = 97, 0
    torch.manual_seed(seed)
    extra = {"attn_implementation": "eager"} if family == "gemma2" else {}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **extra)
    return model.eval()  # no dropout (gpt2 has some): both computations see the same net


def batch() -> Any:
    g = torch.Generator().manual_seed(1)
    rows = []
    for n, prompt in [(9, 5), (6, 2), (12, 3)]:
        ids = torch.randint(3, 97, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return collate(rows, pad_id=0)


def loss_and_grads(model: Any, chunk: int | None) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = nll_sum(model, batch(), chunk)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.item(), grads


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "qwen2_moe"])
def test_families_chunked_equal_the_head_at_once(family: str) -> None:
    model = tiny(family)
    head = output_head(model)
    assert head is not None
    plan = head_plan(model, head, batch())
    assert plan is not None, family  # every family of the matrix takes the chunked path
    cap = getattr(model.config, "final_logit_softcapping", None)
    assert plan.epilogue == Epilogue(softcap=cap)  # gemma2: 30.0, others none
    assert (cap is not None) == (family == "gemma2")
    want_loss, want = loss_and_grads(model, None)
    for chunk in (4, 7, 1024):  # 7 does not divide the 24 target rows
        got_loss, got = loss_and_grads(model, chunk)
        # the same logits, the loss and weight gradients summed in other groupings, and
        # the reassociated hidden-state gradients carried back through the layers
        assert_close(got_loss, want_loss, torch.float32, Kind.REASSOCIATED, "loss")
        scale = float(want.abs().max())
        assert_close(got, want, torch.float32, Kind.REASSOCIATED, f"grads {chunk}", scale)
    # afterwards the head and the model are their plain selves again
    assert "forward" not in head.__dict__ and not head._forward_pre_hooks
    assert model.config.final_logit_softcapping == cap if family == "gemma2" else True
    assert model(input_ids=batch().input_ids).logits.shape[-1] == 97


def test_lora_frozen_head_chunked_and_modules_to_save_fall_back() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules="all-linear"))
    head = output_head(model)
    assert type(head) is torch.nn.Linear and not head.weight.requires_grad
    assert head_plan(model, head, batch()) is not None
    want_loss, want = loss_and_grads(model, None)
    got_loss, got = loss_and_grads(model, 5)
    assert head.weight.grad is None  # frozen: nothing accumulated
    assert_close(got_loss, want_loss, torch.float32, Kind.REASSOCIATED, "loss")
    assert_close(got, want, torch.float32, Kind.REASSOCIATED, "grads", float(want.abs().max()))

    saved = get_peft_model(tiny("llama"), LoraConfig(r=4, modules_to_save=["lm_head"]))
    wrapper = output_head(saved)
    assert wrapper is not None and head_plan(saved, wrapper, batch()) is None  # peft wrapper
    want_loss, _ = loss_and_grads(saved, None)
    got_loss, _ = loss_and_grads(saved, 5)
    assert got_loss == want_loss  # exact: the fallback is the very same computation


def test_unknown_logit_post_processing_falls_back() -> None:
    from transformers import LlamaForCausalLM

    class Shifted(LlamaForCausalLM):  # an epilogue distft does not reproduce
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = super().forward(*args, **kwargs)
            out.logits = out.logits + 0.25
            return out

    base = tiny("llama")
    model = Shifted(base.config)
    model.load_state_dict(base.state_dict())
    head = output_head(model)
    assert head is not None and head_plan(model, head, batch()) is None
    b = batch()
    logits = model(input_ids=b.input_ids).logits[:, :-1]
    targets = b.labels[:, 1:]
    want = F.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1), reduction="sum")
    assert_close(nll_sum(model, b, 8).item(), want.item(), torch.float32, Kind.REASSOCIATED)


def test_cohere_logit_scale_is_reproduced() -> None:
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    config = CohereConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, logit_scale=0.5, pad_token_id=0,
    )  # fmt: skip
    model = CohereForCausalLM(config)
    head = output_head(model)
    assert head is not None
    plan = head_plan(model, head, batch())
    assert plan is not None and plan.epilogue == Epilogue(multiply=0.5)
    want_loss, want = loss_and_grads(model, None)
    got_loss, got = loss_and_grads(model, 5)
    assert model.logit_scale == 0.5  # restored
    assert_close(got_loss, want_loss, torch.float32, Kind.REASSOCIATED, "loss")
    assert_close(got, want, torch.float32, Kind.REASSOCIATED, "grads", float(want.abs().max()))


# ------------------------------------------------------------------ real ZeRO-3 engine

_ZERO3_SCRIPT = """
import json, sys
import deepspeed, torch
from deepspeed.utils import safe_get_full_grad
from distft.config import from_dict
from distft.engine import build_ds_config, create_engine
from distft.objectives import nll_sum
from tests.test_chunked_loss import batch, tiny

deepspeed.init_distributed(dist_backend="gloo")
cfg = from_dict(json.loads(sys.argv[1]))
ds_config, _ = build_ds_config(cfg, world_size=1)
plain = tiny("gemma2")  # tied embeddings and final logit soft-capping
model = tiny("gemma2")
engine = create_engine(model, cfg, ds_config, total_steps=1)
out = {}
plain_loss = nll_sum(plain, batch(), None)
plain_loss.backward()
out["plain"] = [
    plain_loss.item(), {n: p.grad.flatten().tolist() for n, p in plain.named_parameters()}
]
for chunk in (None, 7):
    loss = nll_sum(engine, batch(), chunk)
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p).flatten().tolist() for n, p in model.named_parameters()}
    engine.optimizer.zero_grad()
    out[str(chunk)] = [loss.item(), grads]
out["partitioned"] = model.lm_head.weight.numel() == 0
print("RESULT " + json.dumps(out))
"""


def test_zero3_engine_chunked_equals_plain_and_unchunked() -> None:
    """Real DeepSpeed ZeRO-3 (every parameter partitioned, the tied head included): the
    chunked loss computed inside the head's forward gets the gathered weight, and its
    backward the weight gathered again; loss and full gradients equal the plain model's."""
    raw = {
        "model": {"name_or_path": "tiny"},
        "data": {"train_files": ["train.jsonl"]},
        "checkpoint": {"output_dir": "out"},
        "deepspeed": {
            "zero_stage": 3,
            "precision": "fp32",
            "ds_config": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        },
    }
    out = _run_child(_ZERO3_SCRIPT, raw)
    assert out["partitioned"]  # the head's weight is really sharded away between calls
    want_loss, want = out["plain"]
    for chunk in ("None", "7"):
        loss, grads = out[chunk]
        assert set(grads) == set(want)
        assert_close(loss, want_loss, torch.float32, Kind.REASSOCIATED, f"loss {chunk}")
        got = torch.tensor([x for n in sorted(want) for x in grads[n]])
        ref = torch.tensor([x for n in sorted(want) for x in want[n]])
        scale = float(ref.abs().max())
        assert_close(got, ref, torch.float32, Kind.REASSOCIATED, f"grads {chunk}", scale)


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("value", "expect"),
    [(-1, "greater than or equal to 0"), ("big", "valid integer"), (1.5, "valid integer")],
)
def test_bad_chunk_size_names_the_key(value: Any, expect: str) -> None:
    from distft.config import ConfigError, from_dict

    raw: dict[str, Any] = {
        "model": {"name_or_path": "tiny", "loss_chunk_size": value},
        "data": {"train_files": ["t.jsonl"]},
        "checkpoint": {"output_dir": "out"},
    }
    with pytest.raises(ConfigError, match=f"^model.loss_chunk_size: .*{expect}"):
        from_dict(raw)
    raw["model"]["loss_chunk_size"] = None  # null and 0: the head at once
    assert from_dict(raw).model.loss_chunk_size is None
    raw["model"].pop("loss_chunk_size")
    assert from_dict(raw).model.loss_chunk_size == 1024  # the measured default (README)
