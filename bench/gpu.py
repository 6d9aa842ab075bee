"""Single-GPU throughput: distft (through its real CLI) beside HF Trainer + DeepSpeed.

    python bench/gpu.py                 # one GPU, no network: ~1B Llama, bf16, ZeRO-2
    python bench/gpu.py --tiny          # the same script on CPU at a tiny size (tests)

Builds a ~1.1B-parameter Llama-style model from a config (random init; throughput does not
care) and variable-length samples (log-normal lengths, median 512 tokens) packed into
4096-token sequences, then runs each configuration with both systems:

- `full`: full fine-tuning, ZeRO-2, bf16, no activation checkpointing;
- `full_ckpt`: the same with activation checkpointing;
- `lora`: LoRA r=16 on all linear layers (ZeRO-2, bf16).

Every run does `--warmup` steps and then `--steps` measured steps; tokens/s and MFU are
taken over the measured steps only, from each system's own per-step timestamps. MFU uses
`distft.flops` for both (model FLOPs: 6N or 4N + 6N_lora per token plus attention; see that
module) against the GPU's peak from `distft.flops.PEAK_TFLOPS` or `--peak-tflops`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import siblings as `bench.*`, never top-level
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench import harness as h  # noqa: E402
from bench.samples import write_jsonl  # noqa: E402

CONFIGS = {
    "full": {"model": {"gradient_checkpointing": False}},
    "full_ckpt": {"model": {"gradient_checkpointing": True}},
    "lora": {"lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0,
                      "target_modules": "all-linear"}},
}  # fmt: skip
# ~1.1B parameters: Llama-3.2-1B's shape with a 32k vocabulary (TinyLlama-like).
BIG = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
           intermediate_size=8192, vocab_size=32000)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model, fp32, CPU, few steps")
    p.add_argument("--out", type=Path, help="work directory (default: a new temp dir)")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--systems", default="distft,hf")
    p.add_argument("--steps", type=int, help="measured steps (default 30; tiny 3)")
    p.add_argument("--warmup", type=int, help="unmeasured steps first (default 5; tiny 2)")
    p.add_argument("--micro", type=int, default=2, help="4096-token packs per step")
    p.add_argument("--peak-tflops", type=float, help="override the GPU peak (dense bf16)")
    args = p.parse_args(argv)  # fmt: skip
    args.steps = args.steps or (3 if args.tiny else 30)
    args.warmup = args.warmup or (2 if args.tiny else 5)
    return args


def build_model(root: Path, tiny: bool) -> Path:
    """The model dir: random-init Llama + the tiny offline tokenizer (ids < 512 are used)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from distft.assets import build_tiny_assets

    assets = build_tiny_assets(root / "tiny")
    if tiny:
        return assets.model_dir
    path = root / "model_1b"
    if not (path / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(assets.model_dir)
        config = LlamaConfig(**BIG, max_position_embeddings=4096, tie_word_embeddings=False,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
        import torch

        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path


def build_data(root: Path, seq: int, n_tokens: int) -> Path:
    """Random-token samples, log-normal lengths (median seq/8, cut at seq), >= n_tokens."""
    rng = random.Random(0)
    rows, total = [], 0
    while total < n_tokens:
        n = min(seq, max(16, int(rng.lognormvariate(math.log(seq / 8), 0.8))))
        ids = [rng.randrange(10, 500) for _ in range(n)]
        rows.append({"input_ids": ids, "labels": ids})
        total += n
    return write_jsonl(root / f"packed{seq}.jsonl", rows)


def attn_impl() -> str:
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2"
    except ImportError:
        return "sdpa"


def run_distft(args: argparse.Namespace, root: Path, model: Path, data: Path, name: str,
               seq: int) -> dict[str, Any]:  # fmt: skip
    from bench.suites import distft_config

    work = root / f"distft_{name}"
    out = work / "run"
    gpu = not args.tiny
    cfg = distft_config(
        out, model, data,
        model={"attn_implementation": attn_impl() if gpu else "sdpa"},
        data={"max_seq_len": seq, "batching": "packed"},
        optim={"lr": 1e-4 if name != "lora" else 1e-3, "warmup_steps": 2},
        batch={"micro_batch_size": args.micro, "grad_accum": 1,
               "max_steps": args.warmup + args.steps},
        deepspeed={"zero_stage": 2, "precision": "bf16" if gpu else "fp32"},
        cluster={"num_workers": 1, "gpus_per_worker": 1 if gpu else 0},
        logging={"peak_tflops": args.peak_tflops,
                 "wandb": {"mode": "disabled" if gpu else "offline"}},  # no W&B on the GPU image
    )  # fmt: skip
    for section, values in CONFIGS[name].items():
        cfg.setdefault(section, {}).update(values)
    run = h.run_distft(cfg, work)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # 1B full: ~18 GB each
    rows = run.train_rows[args.warmup - 1 :]  # the last warm-up step opens the window
    span = rows[-1]["time"] - rows[0]["time"]
    measured = rows[1:]
    tokens = sum(r["train/tokens_per_s"] * r["train/step_time_s"] for r in measured)
    tflop = sum(
        r.get("train/tflops_per_s_per_worker", 0) * r["train/step_time_s"] for r in measured
    )
    last = measured[-1]
    peak = (
        last["train/tflops_per_s_per_worker"] / last["train/mfu"] if "train/mfu" in last else None
    )
    return {
        "tok_s": tokens / span,
        "mfu": tflop / span / peak if peak else None,
        "mem_gib": max(r["train/peak_mem_gib"] for r in rows),
        "step_s": span / (len(rows) - 1),
    }


def run_hf(args: argparse.Namespace, root: Path, model: Path, data: Path, name: str,
           seq: int) -> dict[str, Any]:  # fmt: skip
    import torch

    from distft.flops import flop_counter, peak_tflops

    out = root / f"hf_{name}"
    gpu = not args.tiny
    hf_args = ["--model", str(model), "--train", str(data), "--out", str(out),
               "--strategy", "packed", "--micro", str(args.micro), "--accum", "1",
               "--steps", str(args.warmup + args.steps), "--max-seq-len", str(seq),
               "--lr", "1e-4" if name != "lora" else "1e-3", "--warmup", "2",
               "--precision", "bf16" if gpu else "fp32", "--attn", attn_impl() if gpu else "sdpa",
               "--no-save"]  # fmt: skip
    if name == "full_ckpt":
        hf_args.append("--gradient-checkpointing")
    if name == "lora":
        hf_args += ["--lora-r", "16"]
    h.run_torchrun("bench.hf_trainer", hf_args, 1, root / f"hf_{name}.log")
    r = json.loads((out / "result.json").read_text())
    times = r["step_times"][args.warmup - 1 :]
    tokens, squares = r["tokens_per_step"][args.warmup :], r["squares_per_step"][args.warmup :]
    span = times[-1] - times[0]
    from transformers import AutoConfig

    lora = _lora_params(model) if name == "lora" else None
    counter = flop_counter(AutoConfig.from_pretrained(model), lora)
    flops = counter.training(sum(tokens), sum(squares))  # HF computes every position's logits
    device = torch.device("cuda" if gpu else "cpu")
    peak = peak_tflops(device, "bf16" if gpu else "fp32", args.peak_tflops)
    return {
        "tok_s": sum(tokens) / span,
        "mfu": flops / span / (peak * 1e12) if peak else None,
        "mem_gib": max(r["peak_mem_gib"]),
        "step_s": span / (len(times) - 1),
    }


def _lora_params(model: Path) -> int:
    """Adapter weights of r=16 on all linear layers (what the HF baseline trains)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    peft = get_peft_model(base, LoraConfig(r=16, target_modules="all-linear"))
    return sum(p.numel() for p in peft.parameters() if p.requires_grad)


def render(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    head = ("config", "system", "tokens/s", "MFU", "peak mem GiB", "s/step", "vs HF")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, by_system in results.items():
        hf = by_system.get("hf")
        for system, r in by_system.items():
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            vs = f"{r['tok_s'] / hf['tok_s']:.2f}x" if hf and system != "hf" else ""
            lines.append(f"| {name} | {system} | {r['tok_s']:,.0f} | {mfu} | "
                         f"{r['mem_gib']:.1f} | {r['step_s']:.3f} | {vs} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="distft-gpu-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    seq = 256 if args.tiny else 4096
    model = build_model(root, args.tiny)
    data = build_data(root, seq, 2 * seq * args.micro * (args.warmup + args.steps))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    t0 = time.time()
    for name in args.configs.split(","):
        for system in args.systems.split(","):
            fn = run_distft if system == "distft" else run_hf
            results.setdefault(name, {})[system] = fn(args, root, model, data, name, seq)
    (root / "results.json").write_text(json.dumps(results, indent=1))
    what = "tiny Llama, fp32, CPU" if args.tiny else "~1.1B Llama, bf16, ZeRO-2, 1 GPU"
    print(
        f"distft GPU benchmark ({what}; {args.micro} x {seq}-token packs per step, "
        f"{args.steps} measured steps after {args.warmup}; {(time.time() - t0) / 60:.1f} min)"
    )
    print(render(results))


if __name__ == "__main__":
    main()
