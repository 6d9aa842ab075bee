"""The tiny offline assets: layout, idempotence, determinism, tokenizer, template, model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from distft.assets import ASSETS_VERSION, CHAT_TEMPLATE, VOCAB_SIZE, TinyAssets, build_tiny_assets

N_TRAIN, N_EVAL = 300, 40


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    return build_tiny_assets(tmp_path_factory.mktemp("a") / "tiny", n_train=N_TRAIN, n_eval=N_EVAL)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_counts_and_fields(assets: TinyAssets) -> None:
    assert assets.model_dir == assets.root / "model"
    train, eval_ = _read_jsonl(assets.train_file), _read_jsonl(assets.eval_file)
    assert (len(train), len(eval_)) == (N_TRAIN, N_EVAL)
    for record in train + eval_:
        assert set(record) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in record.values())
        assert record["instruction"] and record["output"]
    assert any(r["input"] == "" for r in train) and any(r["input"] for r in train)
    lengths = [len(r["input"]) + len(r["output"]) for r in train]
    assert max(lengths) >= 4 * min(lengths)  # a real spread of lengths
    # held out: no eval prompt appears in train
    train_keys = {(r["instruction"], r["input"]) for r in train}
    assert not train_keys & {(r["instruction"], r["input"]) for r in eval_}
    # a few task outputs are checkable directly
    for r in train:
        if r["instruction"] == "Sort the digits in ascending order.":
            assert r["output"] == "".join(sorted(r["input"]))
        if r["instruction"] == "Reverse the order of these words.":
            assert r["output"].split() == r["input"].split()[::-1]


@pytest.mark.parametrize("split", ["train", "eval"])
def test_chat_files_mirror_instruction_records(assets: TinyAssets, split: str) -> None:
    plain_file, chat_file = (
        (assets.train_file, assets.chat_train_file)
        if split == "train"
        else (assets.eval_file, assets.chat_eval_file)
    )
    plain, chats = _read_jsonl(plain_file), _read_jsonl(chat_file)
    assert len(chats) == len(plain)
    n_system = n_multi = 0
    for record, chat in zip(plain, chats, strict=True):
        assert set(chat) == {"messages"}
        messages = chat["messages"]
        if messages[0]["role"] == "system":
            assert messages[0]["content"] == "You are a helpful assistant."
            n_system += 1
            messages = messages[1:]
        roles = [m["role"] for m in messages]
        assert roles in (["user", "assistant"], ["user", "assistant"] * 2)
        n_multi += len(roles) == 4
        assert messages[0]["content"].startswith(record["instruction"])
        assert messages[0]["content"].endswith(record["input"])
        assert messages[1]["content"] == record["output"]
    assert 0 < n_system < len(chats)
    assert 0 < n_multi < len(chats)


def test_ready_marker_short_circuits_the_rebuild(tmp_path: Path) -> None:
    root = tmp_path / "tiny"
    first = build_tiny_assets(root, n_train=50, n_eval=10)
    assert (root / "READY").read_text().startswith(ASSETS_VERSION)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    second = build_tiny_assets(root, n_train=50, n_eval=10)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temp dirs left behind

    # Other arguments: the stale build is replaced, atomically, by a matching one.
    build_tiny_assets(root, n_train=60, n_eval=10)
    assert len(_read_jsonl(first.train_file)) == 60
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_assets(tmp_path, n_train=10, n_eval=5)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]


def test_build_is_deterministic(assets: TinyAssets, tmp_path: Path) -> None:
    rng_before = torch.get_rng_state()
    again = build_tiny_assets(tmp_path / "again", n_train=N_TRAIN, n_eval=N_EVAL)
    assert torch.equal(torch.get_rng_state(), rng_before)  # caller's RNG left alone

    for name in ("train_file", "eval_file", "chat_train_file", "chat_eval_file"):
        assert getattr(again, name).read_bytes() == getattr(assets, name).read_bytes(), name
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (again.model_dir / name).read_bytes() == (assets.model_dir / name).read_bytes()
    ours = load_file(assets.model_dir / "model.safetensors")
    theirs = load_file(again.model_dir / "model.safetensors")
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key]), key

    other = build_tiny_assets(tmp_path / "other", n_train=N_TRAIN, n_eval=N_EVAL, seed=1)
    assert other.train_file.read_bytes() != assets.train_file.read_bytes()
    other_weights = load_file(other.model_dir / "model.safetensors")
    assert not torch.equal(other_weights["lm_head.weight"], ours["lm_head.weight"])
    assert _all_files(again.root) == _all_files(assets.root)


def test_tokenizer_round_trips_and_specials(assets: TinyAssets) -> None:
    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    assert len(tok) == VOCAB_SIZE
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|end|>", "<|pad|>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    for special in ("<|bos|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"):
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] in tok.all_special_ids, special
    assert tok.chat_template == CHAT_TEMPLATE

    text = "Grüße, 世界! naïve café 🙂🚀 — \t tabs\n\nnew lines  ∑x² <|user|> ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.decode(ids) == text

    enc = tok("Reverse the order of these words.", return_offsets_mapping=True)
    assert len(enc["offset_mapping"]) == len(enc["input_ids"]) > 1
    assert enc["offset_mapping"][-1][1] == len("Reverse the order of these words.")
    # the BPE actually learned merges from the task text
    assert len(enc["input_ids"]) < len("Reverse the order of these words.") // 2


def test_chat_template_is_prefix_consistent(assets: TinyAssets) -> None:
    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Sort the digits in ascending order.\n\n9312"},
        {"role": "assistant", "content": "1239"},
        {"role": "user", "content": "What is 3 plus 4?"},
        {"role": "assistant", "content": "7"},
    ]
    full = tok.apply_chat_template(messages, tokenize=False)
    assert full.startswith("<|bos|><|system|>\n") and full.endswith("<|assistant|>\n7<|end|>\n")
    assert full.count("<|end|>") == len(messages)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        upto = tok.apply_chat_template(messages[: k + 1], tokenize=False)
        assert upto.startswith(prompt) and upto[len(prompt) :] == message["content"] + "<|end|>\n"
        # ... and it holds for the token ids too, so masks can be cut at the prompt length
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        upto_ids = tok(upto, add_special_tokens=False)["input_ids"]
        assert upto_ids[: len(prompt_ids)] == prompt_ids


def test_model_reloads_and_starts_near_uniform(assets: TinyAssets) -> None:
    assert (assets.model_dir / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert (cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size) == (2, 128, len(tok))
    assert not cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert next(model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 139_584

    record = _read_jsonl(assets.chat_train_file)[0]
    ids = tok.apply_chat_template(record["messages"], tokenize=True, return_dict=True)["input_ids"]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        loss = model(input_ids=input_ids, labels=input_ids).loss
    assert math.isfinite(loss.item())
    assert abs(loss.item() - math.log(len(tok))) < 0.5
