"""Added special tokens, `lora.modules_to_save` and NEFTune, in process on the tiny Llama
(distft/assets.py): real transformers and peft, a plain torch optimizer, no Ray."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from distft.checkpoint.fingerprint import fingerprint
from distft.config import Config, from_dict
from distft.data.cache import tokenizer_fingerprint
from distft.errors import UserError
from distft.export.hf_folder import lora_names
from distft.model import build_model, check_model, load_tokenizer
from distft.neftune import attach, noise_scale, sample_lengths
from distft.tolerance import Kind, assert_close

TOOL, OTHER = "<|tool|>", "<|obs|>"


def make_cfg(tiny: Any, model: dict[str, Any] | None = None, **sections: Any) -> Config:
    raw: dict[str, Any] = {
        "seed": 0,
        "model": {"name_or_path": str(tiny.model_dir), **(model or {})},
        "data": {"train_files": [str(tiny.train_file)]},
        "checkpoint": {"output_dir": "out"},
        "deepspeed": {"precision": "fp32"},
        **sections,
    }
    return from_dict(raw)


def lora(**kw: Any) -> dict[str, Any]:
    return {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, **kw}


def train_steps(model: Any, ids: torch.Tensor, steps: int = 3) -> None:
    """A few AdamW steps of next-token loss on `ids` (every position a target)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def tool_ids(tok: Any) -> torch.Tensor:
    text = f"<|user|>\nhi<|end|>\n<|assistant|>\n{TOOL} HI {OTHER}<|end|>"
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


# ------------------------------------------------------------------ added tokens


def test_added_tokens_grow_the_embeddings_with_mean_rows(tiny: Any) -> None:
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(tiny, {"add_special_tokens": [TOOL, OTHER], "pad_vocab_to_multiple_of": 8})
    tok = load_tokenizer(cfg)
    assert len(tok) == 514 and tok.convert_tokens_to_ids([TOOL, OTHER]) == [512, 513]
    assert TOOL in tok.tokenize(f"a {TOOL}b") and tok.decode([512], skip_special_tokens=True) == ""
    base = AutoModelForCausalLM.from_pretrained(tiny.model_dir, dtype=torch.float32)
    model = build_model(cfg, {})  # full fine-tune: every row trains
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == model.config.vocab_size == 520  # 514 -> x8
    for new, old in ((emb, base.get_input_embeddings().weight), (head, base.lm_head.weight)):
        assert torch.equal(new[:512], old)
        # every new row (tokens and padding) is the mean of the old rows, computed the same way
        assert torch.equal(new[512:], old.mean(dim=0).expand(8, -1))
    assert emb.requires_grad and head.requires_grad


def test_no_resize_when_the_tokens_fit_and_the_pad_token(tiny: Any) -> None:
    cfg = make_cfg(tiny, {"pad_token": "<|pad|>"})  # already in the vocabulary
    tok = load_tokenizer(cfg)
    assert tok.pad_token == "<|pad|>" and len(tok) == 512
    assert build_model(cfg, {}).get_input_embeddings().weight.shape[0] == 512
    new_pad = load_tokenizer(make_cfg(tiny, {"pad_token": "<|padding|>"}))
    assert new_pad.pad_token_id == 512 and len(new_pad) == 513


def test_lora_trains_the_new_rows_and_nothing_else_of_the_base(tiny: Any, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = make_cfg(tiny, {"add_special_tokens": [TOOL, OTHER]}, lora=lora())
    tok = load_tokenizer(cfg)
    model = build_model(cfg, {})
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set(lora_names(model))
    rows = sorted(n for n in trained if "trainable_tokens" in n)
    assert len(rows) == 2 and any("embed_tokens" in n for n in rows)  # untied: head rows too
    assert any("lm_head" in n for n in rows)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    emb_layer = model.get_input_embeddings().token_adapter
    before = emb_layer.get_merged_weights(["default"]).detach().clone()

    train_steps(model, tool_ids(tok))

    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    after = emb_layer.get_merged_weights(["default"]).detach()
    assert (after[[512, 513]] - before[[512, 513]]).abs().min() > 0  # every new row moved
    assert torch.equal(after[:512], before[:512])  # the other rows did not

    # what a user does: tokenizer from the adapter folder, base resized, then peft
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    tok.save_pretrained(tmp_path)
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tiny.model_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(loaded_tok))
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    ids = tool_ids(loaded_tok)
    with torch.no_grad():
        want, got = model.eval()(input_ids=ids).logits, loaded(input_ids=ids).logits
    # the same fp32 weights, the reloaded model's forward maybe blocked differently
    assert_close(got, want, torch.float32, Kind.RECOMPUTED, "reloaded adapter logits")


def test_modules_to_save_trains_and_saves_the_head(tiny: Any, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(tiny, lora=lora(modules_to_save=["lm_head"]))
    model = build_model(cfg, {})
    wrapper = model.get_output_embeddings()
    original = wrapper.original_module.weight.detach().clone()
    copy = wrapper.modules_to_save["default"].weight
    assert copy.requires_grad and not wrapper.original_module.weight.requires_grad
    train_steps(model, tool_ids(load_tokenizer(cfg)))
    assert torch.equal(wrapper.original_module.weight, original)
    assert (copy - original).abs().max() > 1e-3

    model.save_pretrained(tmp_path, save_embedding_layers=False)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    head = [k for k in saved if "lm_head" in k]
    assert len(head) == 1 and torch.equal(saved[head[0]], copy.detach())
    base = AutoModelForCausalLM.from_pretrained(tiny.model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.equal(loaded.get_output_embeddings().modules_to_save["default"].weight, copy)


def test_modules_to_save_with_added_tokens_trains_the_head_whole(tiny: Any) -> None:
    cfg = make_cfg(tiny, {"add_special_tokens": [TOOL]}, lora=lora(modules_to_save=["lm_head"]))
    names = {n for n, p in build_model(cfg, {}).named_parameters() if p.requires_grad}
    assert [n for n in names if "trainable_tokens" in n] == [
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"
    ]
    assert "base_model.model.lm_head.modules_to_save.default.weight" in names


# ------------------------------------------------------------------ NEFTune


def test_neftune_lengths_of_packed_samples() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    assert sample_lengths(pos).tolist() == [[3, 3, 3, 2, 2, 4, 4, 4, 4, 1], [6] * 6 + [4] * 4]


def test_neftune_noise_follows_the_formula_and_is_off_in_eval(tiny: Any) -> None:
    alpha = 5.0
    cfg = make_cfg(tiny, {"neftune_alpha": alpha}, lora=lora())
    model = build_model(cfg, {})
    emb = model.get_input_embeddings()
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(10), torch.arange(30)]).expand(2, -1)  # samples of 10 and 30
    clean = emb(ids).detach()
    seen: list[torch.Tensor] = []
    handle = emb.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    model.train()
    model(input_ids=ids, position_ids=pos)
    model.eval()
    model(input_ids=ids, position_ids=pos)
    handle.remove()  # registered after NEFTune's: it sees the noisy output
    noise, eval_out = seen[0] - clean, seen[1]
    assert torch.equal(eval_out, clean)  # eval: no noise at all
    d = clean.size(-1)
    for span, length in ((slice(0, 10), 10), (slice(10, 40), 30)):
        bound = alpha / math.sqrt(length * d)
        part = noise[:, span].abs()
        # U(-b, b): every sample within b, and over 640+ draws the max is close to b and
        # the mean |x| is b/2 (std of the mean ~ b/sqrt(12 n)), fp32 rounding far below
        assert part.max() <= bound * (1 + 1e-5)
        assert part.max() > 0.95 * bound
        assert abs(part.mean().item() / bound - 0.5) < 0.05
    assert torch.allclose(
        noise_scale(alpha, torch.tensor([[10, 30]]), d).flatten(),
        torch.tensor([alpha / math.sqrt(10 * d), alpha / math.sqrt(30 * d)]),
    )


def test_neftune_without_position_ids_uses_the_width_and_the_rng() -> None:
    emb = torch.nn.Embedding(10, 16)
    model = torch.nn.Module()
    model.add_module("emb", emb)
    model.get_input_embeddings = lambda: emb  # type: ignore[method-assign,assignment]
    model.forward = lambda input_ids: emb(input_ids)  # type: ignore[method-assign]
    attach(model, 2.0)
    ids = torch.zeros((1, 25), dtype=torch.long)
    torch.manual_seed(1)
    a = model(input_ids=ids) - emb.weight[0]
    torch.manual_seed(1)
    b = model(input_ids=ids) - emb.weight[0]
    assert torch.equal(a, b)  # drawn from torch's generator: a restored state repeats it
    assert a.abs().max() <= 2.0 / math.sqrt(25 * 16) * (1 + 1e-5)


# ------------------------------------------------------------------ config and keys


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        ({"lora": {"modules_to_save": ["lm_head"]}}, "lora.modules_to_save: needs lora.enabled"),
        (
            {"lora": lora(modules_to_save=["lm_head"]), "deepspeed": {"zero_stage": 3}},
            "lora.modules_to_save: not supported with deepspeed.zero_stage 3",
        ),
        ({"model": {"add_special_tokens": ["<a>", "<a>"]}}, "model.add_special_tokens"),
        ({"model": {"add_special_tokens": [""]}}, "model.add_special_tokens"),
        ({"model": {"pad_token": ""}}, "model.pad_token"),
        ({"model": {"neftune_alpha": 0}}, "model.neftune_alpha"),
        ({"model": {"pad_vocab_to_multiple_of": 0}}, "model.pad_vocab_to_multiple_of"),
    ],
)
def test_config_refusals(sections: dict[str, Any], needle: str) -> None:
    raw: dict[str, Any] = {
        "model": {"name_or_path": "m", **sections.pop("model", {})},
        "data": {"train_files": ["t.jsonl"]},
        "checkpoint": {"output_dir": "out"},
        **sections,
    }
    with pytest.raises((ValidationError, ValueError, UserError)) as e:
        from_dict(raw)
    assert needle in str(e.value), str(e.value)


def test_unknown_module_to_save_is_refused_on_the_driver(tiny: Any) -> None:
    for target in ("all-linear", ["q_proj"]):
        cfg = make_cfg(tiny, lora=lora(modules_to_save=["lm_haed"], target_modules=target))
        with pytest.raises(UserError, match=r"lora.modules_to_save: 'lm_haed' matches no module"):
            check_model(cfg, local_only=True)
    ok = make_cfg(tiny, {"add_special_tokens": [TOOL]}, lora=lora(modules_to_save=["lm_head"]))
    checked, lines = check_model(ok, local_only=True)
    assert checked is not None and any(line.startswith("LoRA adapts") for line in lines)
    assert "tokenizer: 513 tokens; embeddings grown by 1 rows" in lines


def test_added_tokens_change_the_cache_key_and_the_fingerprint(tiny: Any) -> None:
    plain, added = make_cfg(tiny), make_cfg(tiny, {"add_special_tokens": [TOOL]})
    assert tokenizer_fingerprint(load_tokenizer(plain)) != tokenizer_fingerprint(
        load_tokenizer(added)
    )
    assert tokenizer_fingerprint(load_tokenizer(added)) == tokenizer_fingerprint(
        load_tokenizer(make_cfg(tiny, {"add_special_tokens": [TOOL]}))
    )
    assert fingerprint(plain)["model"] != fingerprint(added)["model"]
    neft = make_cfg(tiny, {"neftune_alpha": 5.0})
    assert fingerprint(plain)["model"] != fingerprint(neft)["model"]


# ------------------------------------------------------------------ ZeRO-3

_ZERO3_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import deepspeed, torch
    from distft.config import from_dict
    from distft.engine import build_ds_config, create_engine
    from distft.model import build_model, load_tokenizer

    deepspeed.init_distributed(dist_backend="gloo")
    results = []
    for raw in json.loads(sys.argv[1]):
        cfg = from_dict(raw)
        ds_config, _ = build_ds_config(cfg, world_size=1)
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        torch.manual_seed(0)
        model = build_model(cfg, ds_config)  # resized while partitioned, then LoRA + rows
        engine = create_engine(model, cfg, ds_config, total_steps=3)
        tok = load_tokenizer(cfg)
        token = cfg.model.add_special_tokens[0]
        text = f"<|user|>\\nhi<|end|>\\n<|assistant|>\\n{token} HI<|end|>"
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        emb = engine.module.get_input_embeddings()
        delta = emb.token_adapter.trainable_tokens_delta["default"]
        def rows():
            with deepspeed.zero.GatheredParameters([delta]):
                return delta.detach().clone()
        before, losses = rows(), []
        for _ in range(3):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        base = emb.token_adapter.base_layer.weight
        results.append({
            "rows": list(base.ds_shape), "partitioned": base.numel() < base.ds_numel,
            "moved": (rows() - before).abs().min().item(), "losses": losses,
            "trained": sorted(n for n, p in engine.module.named_parameters() if p.requires_grad),
        })
    print("RESULT " + json.dumps({"runs": results}))
    """
)


def test_zero3_resizes_and_trains_the_new_rows(tiny: Any) -> None:
    """Real DeepSpeed ZeRO-3 on one gloo rank: the resize under zero.Init, peft's trained
    rows built from the gathered embeddings, and their forward/backward while partitioned;
    a new token (resize) and a token the vocabulary has (rows taken from the partitions)."""
    from tests.test_engine_config import _run_child

    def raw(model: dict[str, Any]) -> dict[str, Any]:
        return make_cfg(
            tiny,
            {**model, "attn_implementation": "sdpa"},
            lora=lora(),
            deepspeed={"zero_stage": 3, "precision": "fp32"},
            optim={"lr": 1e-2},
        ).model_dump(mode="json")

    grown = raw({"add_special_tokens": [TOOL], "pad_vocab_to_multiple_of": 8})
    existing = raw({"add_special_tokens": ["<|user|>"]})  # in the vocabulary: no resize
    out = _run_child(_ZERO3_SCRIPT, [grown, existing])  # type: ignore[arg-type]
    for run, rows in zip(out["runs"], (520, 512), strict=True):
        assert run["rows"] == [rows, 64] and run["partitioned"]
        assert run["moved"] > 0 and run["losses"][-1] < run["losses"][0]
        assert sum("trainable_tokens" in n for n in run["trained"]) == 2  # embeddings + head
