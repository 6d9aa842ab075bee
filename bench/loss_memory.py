"""Peak memory and time of the loss (LM head + cross-entropy, forward and backward) over
n target tokens at a 128k vocabulary: the head at once (distft's path before the chunked
loss: `F.cross_entropy(F.linear(h, W).float(), t)`) vs `distft.objectives.chunked_ce`, and on CUDA
Liger's fused linear cross-entropy when `liger_kernel` is installed.

    python -m bench.loss_memory [--device cpu|cuda] [--vocab 128256] [--hidden 4096]
        [--tokens 4096 8192 16384 32768] [--chunk 1024] [--max-unchunked N] [--json]
    python -m bench.loss_memory --step --vocab 128256 --hidden 256 --tokens 2048

Each case runs in a fresh subprocess. CPU: peak RSS (ru_maxrss) over the case minus the
RSS after its inputs (hidden states, weight, targets) exist; fp32. CUDA:
torch.cuda.max_memory_allocated minus the allocated bytes after the inputs; bf16 weight
and hidden states (logits to fp32 as distft does). The weight and hidden states require
grad (a full fine-tune), so both gradients are part of the peak in every column.
`--max-unchunked N` skips the head-at-once path above N tokens (its fp32 logits at 32k
tokens x 128k vocabulary are 16 GiB, three such tensors at its peak).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

METHODS = ("unchunked", "chunked", "liger")


def _case(method: str, device: str, vocab: int, hidden: int, n: int, chunk: int) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    import resource

    import torch
    import torch.nn.functional as F

    from distft.objectives.chunked_ce import chunked_nll_sum

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(n, hidden, generator=g) * 0.5).to(dev, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(dev, dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=g).to(dev)

    def run() -> torch.Tensor:
        if method == "unchunked":
            return F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
        if method == "chunked":
            return chunked_nll_sum(h, w, None, t, chunk)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss: torch.Tensor = LigerFusedLinearCrossEntropyLoss(reduction="sum")(w, h, t)
        return loss

    def rss() -> int:  # peak RSS so far, bytes (Linux reports KiB)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    if dev.type == "cuda":
        run().backward()  # warm-up: kernels, workspaces
        h.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss()
    t0 = time.perf_counter()
    loss = run()
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = rss() - base
    seconds = time.perf_counter() - t0
    return {"method": method, "tokens": n, "peak_bytes": peak, "seconds": seconds,
            "loss": loss.item()}  # fmt: skip


def step_times(
    vocab: int, hidden: int, tokens: int, chunk: int, reps: int, device: str = "cpu"
) -> dict[str, float]:
    """Median seconds of one training micro-step (`nll_sum` forward + backward) of a
    2-layer Llama of this vocabulary and width, one row of `tokens` tokens, half of them
    targets, the head at once vs chunked (interleaved, after one warm-up each)."""
    import statistics

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distft.data import IGNORE, collate
    from distft.objectives import nll_sum

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=tokens)  # fmt: skip
    dev = torch.device(device)
    model = LlamaForCausalLM(config).to(
        dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    )
    ids = torch.randint(3, vocab, (tokens,)).tolist()
    b = collate([{"input_ids": ids, "labels": [IGNORE] * (tokens // 2) + ids[tokens // 2 :]}], 0)
    b = b.to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {"unchunked": [], "chunked": []}
    for i in range(reps + 1):
        for name, c in (("unchunked", None), ("chunked", chunk)):
            t0 = time.perf_counter()
            nll_sum(model, b, c).backward()
            model.zero_grad(set_to_none=True)
            sync()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _measure(args: argparse.Namespace, method: str, n: int) -> dict[str, Any] | None:
    cmd = [sys.executable, "-m", "bench.loss_memory", "--case", method, "--device", args.device,
           "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--tokens", str(n),
           "--chunk", str(args.chunk)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"{method} at {n} tokens failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _methods(device: str) -> list[str]:
    methods = ["unchunked", "chunked"]
    if device == "cuda":
        try:
            import liger_kernel  # noqa: F401

            methods.append("liger")
        except ImportError:
            pass
    return methods


def _table(rows: list[dict[str, Any]], methods: list[str]) -> str:
    gib = 2**30
    head = ["tokens"] + [f"{m} peak GiB (s)" for m in methods] + ["unchunked / chunked"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in sorted({r["tokens"] for r in rows}):
        by = {r["method"]: r for r in rows if r["tokens"] == n}
        cells = [str(n)]
        for m in methods:
            r = by.get(m)
            cells.append(
                "skipped" if r is None else f"{r['peak_bytes'] / gib:.3f} ({r['seconds']:.2f})"
            )
        u, c = by.get("unchunked"), by.get("chunked")
        ratio = u["peak_bytes"] / max(c["peak_bytes"], 1) if u and c else None
        cells.append("-" if ratio is None else f"{ratio:.1f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--max-unchunked", type=int, default=None)
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    p.add_argument(
        "--step",
        action="store_true",
        help="time a tiny Llama's micro-step instead (--tokens[0] tokens)",
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--case", choices=METHODS, help=argparse.SUPPRESS)  # one subprocess
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(_case(args.case, args.device, args.vocab, args.hidden,
                               args.tokens[0], args.chunk)))  # fmt: skip
        return 0
    if args.step:
        t = step_times(args.vocab, args.hidden, args.tokens[0], args.chunk, args.reps, args.device)
        print(
            f"step ({args.device}), vocab {args.vocab}, hidden {args.hidden}, "
            f"{args.tokens[0]} tokens, "
            f"chunk {args.chunk}: head at once {t['unchunked']:.3f} s, "
            f"chunked {t['chunked']:.3f} s ({t['chunked'] / t['unchunked']:.2f}x)"
        )
        return 0
    methods = _methods(args.device)
    rows = []
    for n in args.tokens:
        for m in methods:
            if m == "unchunked" and args.max_unchunked is not None and n > args.max_unchunked:
                continue
            r = _measure(args, m, n)
            if r is not None:
                rows.append(r)
    dtype = "bf16" if args.device == "cuda" else "fp32"
    print(f"loss forward+backward, vocab {args.vocab}, hidden {args.hidden}, {dtype}, "
          f"chunk {args.chunk}, device {args.device}")  # fmt: skip
    print(_table(rows, methods))
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
