"""Useful (non-pad) tokens per second of training forward+backward for each batching
strategy, on the same variable-length SFT samples, in the same process.

    .venv/bin/python -m bench.data_strategies [--samples 400 --repeats 3 ...]

Every strategy goes through the real data path (`TrainBatches.for_step` -> `Batch` ->
`distft.objectives.nll_sum`) over one whole epoch of the same samples. Strategies run
interleaved (A B C A B C ...) so drift on a shared machine hits all of them alike; the
table shows the median over repeats, the pad fraction (padding cells / batch cells) and
the share of micro-batches that carry no attention mask at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distft.assets import build_tiny_assets
from distft.config import from_dict
from distft.data import Conversation, Split, TrainBatches
from distft.data.tokenize import Encoder, EncodeSettings, TokenizeReport
from distft.dist import DistContext
from distft.objectives import nll_sum

WORDS = [
    "cat",
    "dog",
    "sun",
    "moon",
    "tree",
    "river",
    "stone",
    "bird",
    "fish",
    "rain",
    "snow",
    "wind",
    "fire",
    "leaf",
    "hill",
    "road",
]


def sft_samples(n: int, rng: np.random.Generator) -> list[Conversation]:
    """Chats with long-tailed prompt and answer lengths (lognormal, like real SFT data)."""
    out = []
    for i in range(n):

        def words(median: float) -> str:
            k = int(np.clip(rng.lognormal(np.log(median), 0.9), 1, 700))
            return " ".join(rng.choice(WORDS, size=k))

        messages = [{"role": "system", "content": "Be helpful."}] if rng.random() < 0.3 else []
        for _ in range(1 + int(rng.random() < 0.2)):
            messages.append({"role": "user", "content": words(40)})
            messages.append({"role": "assistant", "content": words(60)})
        out.append(Conversation(f"synthetic:{i + 1}", messages))
    return out


def make_model(vocab: int, hidden: int, layers: int, attn: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=4096,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).float().train()


def epoch_batches(split: Split, batching: str, micro: int, max_seq_len: int, attn: str, pad: int):
    cfg = from_dict(
        {
            "model": {"name_or_path": "unused", "attn_implementation": attn},
            "data": {"train_files": ["unused"], "batching": batching, "max_seq_len": max_seq_len},
            "batch": {"micro_batch_size": micro, "grad_accum": 1},
            "checkpoint": {"output_dir": "unused"},
        }
    )
    # a Llama: no sliding windows, so packed rows get distft's block-diagonal mask
    tb = TrainBatches(split, cfg, DistContext(0, 1, 0, torch.device("cpu")), pad, windowed=False)
    return [b for s in range(tb.steps_per_epoch) for b in tb.for_step(s)]


def with_padding_mask(batches: list, pad: int) -> list:
    """The same batches with a 2-D padding mask where they are padded (what a
    Hugging Face collator passes); distft leaves right padding unmasked."""
    out = []
    for b in batches:
        mask = (b.input_ids != pad).long()
        out.append(dataclasses.replace(b, attention_mask=None if bool(mask.all()) else mask))
    return out


def run_once(model: torch.nn.Module, batches: list) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for forward+backward of `batches`."""
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches:
        loss = nll_sum(model, b)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--micro", type=int, default=4, help="micro_batch_size (budget: x max_seq_len)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        assets = build_tiny_assets(Path(tmp) / "tiny", n_train=10, n_eval=5)
        tok = AutoTokenizer.from_pretrained(assets.model_dir)
    convs = sft_samples(args.samples, np.random.default_rng(0))
    rows = list(
        Encoder(tok, EncodeSettings(args.max_seq_len)).encode_many(convs, "error", TokenizeReport())
    )
    split = Split.from_lists([r[0].tolist() for r in rows], [r[1].tolist() for r in rows])
    lengths = split.lengths
    print(
        f"{len(split)} samples, {int(lengths.sum()):,} tokens; length median "
        f"{np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}; "
        f"model hidden {args.hidden} x {args.layers} layers, {args.attn}, "
        f"{torch.get_num_threads()} threads"
    )
    model = make_model(len(tok), args.hidden, args.layers, args.attn)
    strategies = {
        f"padded (micro {args.micro})": ("padded", args.micro),
        f"length_grouped (<= {args.micro}x{args.max_seq_len} tok)": ("length_grouped", args.micro),
        f"packed ({args.micro} x {args.max_seq_len})": ("packed", args.micro),
        f"packed (1 x {args.max_seq_len})": ("packed", 1),
    }
    plans = {
        name: epoch_batches(split, batching, micro, args.max_seq_len, args.attn, tok.pad_token_id)
        for name, (batching, micro) in strategies.items()
    }
    for name in list(plans)[:2]:
        plans[f"{name} + padding mask"] = with_padding_mask(plans[name], tok.pad_token_id)
    run_once(model, plans[next(iter(plans))][:2])  # warm-up
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in plans}
    for _ in range(args.repeats):
        for name, batches in plans.items():
            times[name].append(run_once(model, batches))

    print(f"\n| strategy | micro-batches | useful tok/s (median of {args.repeats}) | "
          "useful tok per CPU-s | pad fraction | no-mask batches |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, batches in plans.items():
        useful = sum(b.n_tokens for b in batches)
        cells = sum(b.input_ids.numel() for b in batches)
        unmasked = sum(b.attention_mask is None and b.mask is None for b in batches)
        wall = statistics.median(t for t, _ in times[name])
        cpu = statistics.median(c for _, c in times[name])
        print(
            f"| {name} | {len(batches)} | {useful / wall:,.0f} | {useful / cpu:,.0f} | "
            f"{1 - useful / cells:.3f} | {unmasked}/{len(batches)} |"
        )


if __name__ == "__main__":
    main()
