"""Synthetic benchmark data, written once as pre-tokenized JSONL (`input_ids`, `labels`) so
that distft and every baseline train on exactly the same token sequences.

- `sft_samples`: instruction-like chats on the tiny tokenizer, lengths skewed like real
  SFT data (log-normal, median ~100 tokens, long tail cut at 512). Each sample is a chat
  of small deterministic tasks (reverse words, sort digits, add numbers, upper-case), so
  a model really learns it and eval loss means something; loss only on assistant tokens.
- `fixed_samples`: random tokens of one length (no padding anywhere): the P1 overhead
  data, where batching strategy cannot matter.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np

IGNORE = -100
_WORDS = "cat dog sun moon tree river stone bird fish rain snow wind fire leaf hill road".split()  # noqa: SIM905
_SYLLABLES = "ba ko ri te mu sa lo ne vi da pe zu go hi ra to".split()  # noqa: SIM905


def _task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 10))]
        return "Reverse the order of these words.\n\n" + " ".join(words), " ".join(words[::-1])
    if kind == 1:
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 16)))
        return "Sort the digits in ascending order.\n\n" + digits, "".join(sorted(digits))
    if kind == 2:
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return f"What is {a} plus {b}?", str(a + b)
    word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
    return "Write the word in uppercase.\n\n" + word, word.upper()


def sft_samples(
    tokenizer: Any, n: int, seed: int, median: int = 88, sigma: float = 0.7, max_len: int = 512
) -> list[dict[str, list[int]]]:
    """`n` chats rendered like the tiny chat template, tokenized turn by turn."""
    rng = random.Random(seed)

    def tok(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out = []
    for _ in range(n):
        target = min(max_len, max(16, int(rng.lognormvariate(math.log(median), sigma))))
        ids, labels = [tokenizer.bos_token_id], [IGNORE]
        while len(ids) < target:
            question, answer = _task(rng)
            prompt = tok(f"<|user|>\n{question}<|end|>\n<|assistant|>\n")
            reply = tok(f"{answer}<|end|>\n")
            ids += prompt + reply
            labels += [IGNORE] * len(prompt) + reply
        out.append({"input_ids": ids[:max_len], "labels": labels[:max_len]})
    return out


def fixed_samples(n: int, length: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, vocab, size=(n, length)).tolist()
    return [{"input_ids": row, "labels": row} for row in ids]


def write_jsonl(path: Path, rows: list[dict[str, list[int]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, list[int]]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def length_stats(rows: list[dict[str, list[int]]]) -> dict[str, float]:
    lengths = np.array([len(r["input_ids"]) for r in rows])
    targets = sum(sum(1 for x in r["labels"][1:] if x != IGNORE) for r in rows)
    return {
        "samples": len(rows),
        "median": float(np.median(lengths)),
        "mean": float(lengths.mean()),
        "p90": float(np.percentile(lengths, 90)),
        "max": int(lengths.max()),
        "tokens": int(lengths.sum()),
        "target_tokens": targets,
    }
