"""Encoding preference pairs against encoding their sides as single samples.

    .venv/bin/python -m bench.pair_encoding [--pairs 4000] [--repeats 3]

Per record form (strings; a prompt conversation; two whole conversations), the same
sides are encoded three ways with the tiny tokenizer and its chat template, best of
`--repeats`: as 2N single samples through `Encoder.encode_many` (the baseline: what SFT
costs for the same text, conversations with `train_on: last_assistant_turn`); as N `Pair`s
through `encode_many` (chunked); and as N pairs one `encode` call each. The table gives
each against the baseline (a ratio near 1: a pair costs what its two sides cost), and
checks that pairs and baseline give the same rows.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distft.assets import build_tiny_assets
from distft.data import Pair, encode
from distft.data.formats import to_sample
from distft.data.tokenize import Encoder, EncodeSettings, TokenizeReport

WORDS = ["cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "fish", "rain", "snow",
         "wind", "fire", "leaf", "hill", "road"]  # fmt: skip


def _words(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n))


def records(form: str, n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        q, good, bad = _words(i, 24), _words(i + 1, 40), _words(i + 2, 40)
        user = [{"role": "user", "content": q}]
        if form == "strings":
            out.append({"prompt": q, "chosen": good, "rejected": bad})
        elif form == "prompt_messages":
            out.append({"prompt": user, "chosen": good, "rejected": bad})
        else:
            out.append({"chosen": [*user, {"role": "assistant", "content": good}],
                        "rejected": [*user, {"role": "assistant", "content": bad}]})  # fmt: skip
    return out


def best(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, tuple[float, Any]]:
    """The best time of each function and its result; the functions take turns, so a
    slower spell of a shared machine falls on all of them."""
    out: dict[str, tuple[float, Any]] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            result = fn()
            took = time.perf_counter() - t0
            out[name] = min(out.get(name, (took, result)), (took, result), key=lambda x: x[0])
    return out


def compare(tok: Any, form: str, n: int, repeats: int) -> str:
    pairs = [to_sample(r, f"b:{i}", "auto", None) for i, r in enumerate(records(form, n))]
    sides = [s for p in pairs if isinstance(p, Pair) for s in (p.chosen, p.rejected)]
    single = Encoder(tok, EncodeSettings(512, train_on="last_assistant_turn"))
    paired = Encoder(tok, EncodeSettings(512))
    t = best(
        {
            "singles": lambda: list(single.encode_many(sides, "error", TokenizeReport())),
            "pairs": lambda: list(paired.encode_many(pairs, "error", TokenizeReport())),
            "alone": lambda: [encode(tok, p, 512) for p in pairs],
        },
        repeats,
    )
    rows = zip(t["singles"][1], t["pairs"][1], strict=True)
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in rows), form
    base = t["singles"][0]
    ratios = t["pairs"][0] / base, t["alone"][0] / base
    return f"{form:<16} {n:>6} {base:>10.3f} {ratios[0]:>14.2f} {ratios[1]:>19.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(build_tiny_assets(Path(tmp) / "tiny").model_dir)
    print(f"{'form':<16} {'pairs':>6} {'singles s':>10} {'pairs/singles':>14} "
          f"{'one-by-one/singles':>19}")  # fmt: skip
    for form in ("strings", "prompt_messages", "conversations"):
        print(compare(tok, form, args.pairs, args.repeats))


if __name__ == "__main__":
    main()
