"""Tiny offline assets for the demo and the tests: a random-init Llama, a BPE tokenizer, a
synthetic instruction dataset on which its eval loss drops clearly within ~100 optimizer steps,
and general text (simple grammatical sentences) that the demo pre-trains the tiny model on.

Everything is built locally (no hub access), deterministically from one seed, into a temp
directory that is renamed onto ``root`` only once complete; ``root/READY`` is written last.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

ASSETS_VERSION = "distft-tiny-assets-v3"
VOCAB_SIZE = 512
SYSTEM_PROMPT = "You are a helpful assistant."
BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Prefix-consistent: rendering messages[:k] with a generation prompt is a string prefix of
# rendering messages[:k+1] whenever message k is the assistant's.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

Record = dict[str, str]
Message = dict[str, str]

_WORDS = (  # noqa: SIM905 (a word list reads better as text)
    "cat dog sun moon tree river stone bird fish rain snow wind fire leaf hill road "
    "book lamp door cup milk bread apple pear plum rose star cloud boat ship wolf bear "
    "fox owl frog goat lion mouse seed corn salt gold iron glass paper chair table "
    "green blue red black white small big fast slow warm cold soft loud"
).split()
_ANIMALS = "cat dog bird fish wolf bear fox owl frog goat lion mouse".split()  # noqa: SIM905
_THINGS = (  # noqa: SIM905
    "tree river stone book lamp door cup milk bread apple pear plum rose boat ship seed".split()  # noqa: SIM905
)
_ADJECTIVES = "green blue red black white small big fast slow warm cold soft loud".split()  # noqa: SIM905
_VERBS = "sees finds likes takes wants hears".split()  # noqa: SIM905
_PLACES = "hill road river cloud table chair".split()  # noqa: SIM905
_SYLLABLES = "ba ko ri te mu sa lo ne vi da pe zu go hi ra to mi ku se ya".split()  # noqa: SIM905


@dataclass(frozen=True)
class TinyAssets:
    root: Path
    model_dir: Path  # HF model dir that also holds the tokenizer files
    train_file: Path  # instruction-format JSONL
    eval_file: Path  # held-out instruction-format JSONL
    chat_train_file: Path  # the same records as chat (`messages`) JSONL
    chat_eval_file: Path
    general_train_file: Path  # general text (`text` format JSONL): the demo's pre-training
    general_eval_file: Path
    pref_train_file: Path  # preference pairs of the same tasks (chosen right, rejected not)
    pref_eval_file: Path


def _layout(root: Path) -> TinyAssets:
    data = root / "data"
    return TinyAssets(
        root=root,
        model_dir=root / "model",
        train_file=data / "train.jsonl",
        eval_file=data / "eval.jsonl",
        chat_train_file=data / "chat_train.jsonl",
        chat_eval_file=data / "chat_eval.jsonl",
        general_train_file=data / "general_train.jsonl",
        general_eval_file=data / "general_eval.jsonl",
        pref_train_file=data / "pref_train.jsonl",
        pref_eval_file=data / "pref_eval.jsonl",
    )


def build_tiny_assets(
    root: Path, *, n_train: int = 2000, n_eval: int = 200, seed: int = 0
) -> TinyAssets:
    """Build (or reuse) the tiny model, tokenizer and datasets under ``root``.

    Reuses ``root`` when its READY marker matches these arguments. A ``root`` without a
    marker is not ours and is never deleted; one with a stale marker is replaced atomically.
    """
    root = Path(root)
    marker = f"{ASSETS_VERSION} n_train={n_train} n_eval={n_eval} seed={seed}\n"
    ready = root / "READY"
    if ready.is_file() and ready.read_text() == marker:
        return _layout(root)
    if root.exists() and not ready.is_file() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and has no READY marker; not overwriting it")

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0o700
    try:
        _build_into(_layout(tmp), n_train=n_train, n_eval=n_eval, seed=seed)
        (tmp / "READY").write_text(marker)
        _publish(tmp, root, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed onto root
    return _layout(root)


def _publish(tmp: Path, root: Path, marker: str) -> None:
    """Move the finished build onto ``root``; a concurrent identical build may win the race."""
    ready = root / "READY"
    if ready.is_file() and ready.read_text() == marker:
        return  # a concurrent identical build finished first
    stale: Path | None = None
    if ready.is_file():  # an older build of ours: set it aside, then swap
        stale = root.parent / f".{root.name}.stale-{os.getpid()}"
        os.replace(root, stale)
    try:
        os.replace(tmp, root)
    except OSError:
        if not (ready.is_file() and ready.read_text() == marker):
            raise
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def _build_into(layout: TinyAssets, *, n_train: int, n_eval: int, seed: int) -> None:
    train, eval_ = _make_splits(n_train, n_eval, random.Random(seed))
    layout.train_file.parent.mkdir(parents=True)
    _write_jsonl(layout.train_file, train)
    _write_jsonl(layout.eval_file, eval_)
    _write_jsonl(layout.chat_train_file, _to_chat(train, random.Random(seed + 1)))
    _write_jsonl(layout.chat_eval_file, _to_chat(eval_, random.Random(seed + 2)))
    _write_jsonl(layout.general_train_file, general_text(n_train, random.Random(seed + 5)))
    _write_jsonl(layout.general_eval_file, general_text(n_eval, random.Random(seed + 6)))
    _write_jsonl(layout.pref_train_file, preference_pairs(train, random.Random(seed + 7)))
    _write_jsonl(layout.pref_eval_file, preference_pairs(eval_, random.Random(seed + 8)))

    # The tokenizer corpus has a fixed size, so the vocabulary does not depend on n_train.
    corpus_rng = random.Random(seed + 3)
    corpus = [_make_record(corpus_rng) for _ in range(2000)]
    tokenizer = _build_tokenizer(_corpus_text(corpus, random.Random(seed + 4)))
    tokenizer.save_pretrained(layout.model_dir)
    _build_model(tokenizer, seed).save_pretrained(layout.model_dir)


# ---------------------------------------------------------------- dataset


def _made_up_word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))


def _reverse(rng: random.Random) -> Record:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 10))]
    instruction = "Reverse the order of these words."
    return {"instruction": instruction, "input": " ".join(words), "output": " ".join(words[::-1])}


def _sort_digits(rng: random.Random) -> Record:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 16)))
    instruction = "Sort the digits in ascending order."
    return {"instruction": instruction, "input": digits, "output": "".join(sorted(digits))}


def _add(rng: random.Random) -> Record:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)}
    return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}


def _uppercase(rng: random.Random) -> Record:
    word = _made_up_word(rng)
    return {"instruction": "Write the word in uppercase.", "input": word, "output": word.upper()}


def _repeat(rng: random.Random) -> Record:
    word, n = _made_up_word(rng), rng.randint(1, 8)
    instruction = f"Repeat the word {n} times."
    return {"instruction": instruction, "input": word, "output": " ".join([word] * n)}


Task = Callable[[random.Random], Record]
_TASKS: tuple[Task, ...] = (_reverse, _sort_digits, _add, _uppercase, _repeat)


def _make_record(rng: random.Random) -> Record:
    return rng.choice(_TASKS)(rng)


def _make_splits(n_train: int, n_eval: int, rng: random.Random) -> tuple[list[Record], ...]:
    """Train and eval records; no eval prompt also appears in train (or twice in eval)."""
    train = [_make_record(rng) for _ in range(n_train)]
    seen = {(r["instruction"], r["input"]) for r in train}
    eval_: list[Record] = []
    for _ in range(100 * n_eval):
        if len(eval_) == n_eval:
            break
        record = _make_record(rng)
        key = (record["instruction"], record["input"])
        if key not in seen:
            seen.add(key)
            eval_.append(record)
    if len(eval_) < n_eval:
        raise RuntimeError(f"could not draw {n_eval} held-out records")
    return train, eval_


def _user_text(record: Record) -> str:
    if record["input"]:
        return f"{record['instruction']}\n\n{record['input']}"
    return record["instruction"]


def _to_chat(records: list[Record], rng: random.Random) -> list[dict[str, list[Message]]]:
    """One chat per record: ~30% with a system prompt, ~15% with a follow-up turn taken
    from the next record of the same split."""
    chats: list[dict[str, list[Message]]] = []
    for i, record in enumerate(records):
        turns = [record]
        if len(records) > 1 and rng.random() < 0.15:
            turns.append(records[(i + 1) % len(records)])
        messages: list[Message] = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": SYSTEM_PROMPT})
        for turn in turns:
            messages.append({"role": "user", "content": _user_text(turn)})
            messages.append({"role": "assistant", "content": turn["output"]})
        chats.append({"messages": messages})
    return chats


def _wrong(record: Record, rng: random.Random) -> str:
    """A plausible answer that does not do the task: the input unchanged, a near miss."""
    right, given = record["output"], record["input"]
    if given and given != right and rng.random() < 0.5:
        return given  # not reversed / sorted / uppercased
    if right.isdigit():
        return str(int(right) + rng.choice([-11, -2, -1, 1, 2, 10]))
    words = right.split()
    if len(words) > 1:
        return " ".join(words[:-1]) if rng.random() < 0.5 else right + " " + words[0]
    return right.lower() if right.lower() != right else right + right


def preference_pairs(records: list[Record], rng: random.Random) -> list[dict[str, object]]:
    """One pair per record: the prompt as a conversation (~30% with a system prompt), the
    right answer chosen, a wrong one rejected."""
    pairs: list[dict[str, object]] = []
    for record in records:
        prompt: list[Message] = []
        if rng.random() < 0.3:
            prompt.append({"role": "system", "content": SYSTEM_PROMPT})
        prompt.append({"role": "user", "content": _user_text(record)})
        wrong = _wrong(record, rng)
        assert wrong != record["output"], record
        pairs.append({"prompt": prompt, "chosen": record["output"], "rejected": wrong})
    return pairs


def _write_jsonl(
    path: Path, rows: list[Record] | list[dict[str, list[Message]]] | list[dict[str, object]]
) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _corpus_text(records: list[Record], rng: random.Random) -> Iterator[str]:
    for chat in _to_chat(records, rng):
        for message in chat["messages"]:
            yield message["content"]


# ---------------------------------------------------------------- general text


def _noun_phrase(rng: random.Random, nouns: list[str]) -> str:
    words = ([rng.choice(_ADJECTIVES)] if rng.random() < 0.5 else []) + [rng.choice(nouns)]
    article = rng.choice(("the", "an" if words[0][0] in "aeiou" else "a"))
    return " ".join([article, *words])


def _sentence(rng: random.Random) -> str:
    """`<animal phrase> <verb> <thing phrase>[ on the <place>].`, capitalised: a small
    grammar (animals act, things are acted on) a 2-layer model learns in a few hundred steps."""
    words = f"{_noun_phrase(rng, _ANIMALS)} {rng.choice(_VERBS)} {_noun_phrase(rng, _THINGS)}"
    if rng.random() < 0.3:
        words += f" on the {rng.choice(_PLACES)}"
    return words[0].upper() + words[1:] + "."


def general_text(n: int, rng: random.Random) -> list[Record]:
    """`n` short paragraphs (2 to 4 sentences) as `text` records."""
    return [{"text": " ".join(_sentence(rng) for _ in range(rng.randint(2, 4)))} for _ in range(n)]


# ---------------------------------------------------------------- tokenizer and model


def _build_tokenizer(texts: Iterator[str]) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD, *ROLE_TOKENS]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknowns
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    # No post-processor: plain encodes add no BOS; the chat template writes it itself.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def _build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()
