"""The baseline users would pick instead of distft: Hugging Face Trainer + DeepSpeed (what
Axolotl and LLaMA-Factory run underneath), on pre-tokenized JSONL samples.

Run under torchrun, one process per worker, for example:

    python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \
        bench/hf_trainer.py --model M --train T.jsonl --out DIR --strategy group_by_length

`--strategy` picks how batches are formed:
- `random`: the default sampler; a micro-batch is padded to its longest sample;
- `group_by_length`: `train_sampling_strategy="group_by_length"` (`LengthGroupedSampler`,
  what `group_by_length=True` became in transformers 5), padded;
- `batch_rebalance`: `train_sampling_strategy="batch_rebalance"`, padded;
- `flatten`: `DataCollatorWithFlattening`: a micro-batch is one row, samples isolated by
  position ids (padding-free);
- `packed`: samples packed best-fit into rows of `--max-seq-len` tokens beforehand,
  isolated by position ids (what TRL's SFTTrainer packing does); a micro-batch is
  `--micro` such rows.

Rank 0 writes `<out>/result.json`: the wall-clock time at the end of every optimizer step,
the real (non-pad) tokens of every step summed over ranks (and the sum of squared sample
lengths, for attention FLOPs; both counted from the micro-batches the model actually got,
with `distft.flops.sequence_lengths`), every rank's peak memory, and
saves the trained model to `<out>/final` unless `--no-save`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

if __package__ in (None, ""):  # run as a file: import siblings as `bench.*`, never top-level
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.samples import IGNORE, read_jsonl  # noqa: E402
from distft.flops import sequence_lengths  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--strategy",
        default="group_by_length",
        choices=["random", "group_by_length", "batch_rebalance", "flatten", "packed"],
    )
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=110)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora-r", type=int, default=0, help="0: full fine-tuning")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)  # fmt: skip


def pack_rows(rows: list[dict[str, list[int]]], capacity: int) -> list[dict[str, list[int]]]:
    """Best-fit decreasing into rows of <= capacity tokens; positions restart per sample."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(rows[i]["input_ids"])
        fits = [b for b in range(len(bins)) if room[b] >= n]
        if fits:
            b = min(fits, key=lambda k: room[k])
            bins[b].append(i)
            room[b] -= n
        else:
            bins.append([i])
            room.append(capacity - n)
    packed = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in members:
            ids += rows[i]["input_ids"]
            labels += [IGNORE] + rows[i]["labels"][1:]  # never predict across samples
            pos += list(range(len(rows[i]["input_ids"])))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return packed


class Collator:
    """Pads a micro-batch (2-D mask), packs it (position ids, no mask) or flattens it."""

    def __init__(self, pad_id: int, strategy: str):
        from transformers import DataCollatorWithFlattening

        self.pad_id, self.strategy = pad_id, strategy
        self.flatten = DataCollatorWithFlattening() if strategy == "flatten" else None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.flatten is not None:
            feats = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
            return self.flatten(feats)
        width = max(len(f["input_ids"]) for f in features)
        n = len(features)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = (
                torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1,
            )  # fmt: skip
            if "position_ids" in f:
                pos[i, :k] = torch.tensor(f["position_ids"])
                pos[i, k:] = torch.arange(width - k)  # padding: a block of its own
        if self.strategy == "packed":
            return {"input_ids": ids, "labels": labels, "position_ids": pos}
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def ds_config(args: argparse.Namespace) -> dict[str, Any]:
    """The same ZeRO knobs distft generates (distft.engine.build_ds_config)."""
    zero: dict[str, Any] = {"stage": args.zero}
    if args.zero > 0:
        zero.update(overlap_comm=True, contiguous_gradients=True,
                    reduce_bucket_size=500_000_000, allgather_bucket_size=500_000_000)  # fmt: skip
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 2**31 - 1,
        "zero_optimization": zero,
    }
    if args.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def main(argv: list[str] | None = None) -> None:
    import datasets
    import torch.distributed as tdist
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    args = parse_args(argv)
    out = Path(args.out)
    cuda = torch.cuda.is_available()
    rows = read_jsonl(Path(args.train))
    if args.strategy == "packed":
        rows = pack_rows(rows, args.max_seq_len)
    train = datasets.Dataset.from_list(rows)
    train = train.add_column("length", [len(r["input_ids"]) for r in rows])
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32,
        attn_implementation=args.attn,
    )
    model.config.use_cache = False
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        lora = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=2 * args.lora_r,
                          lora_dropout=0.0, target_modules="all-linear")  # fmt: skip
        model = get_peft_model(model, lora)
    samplers = ("group_by_length", "batch_rebalance")
    sampling = args.strategy if args.strategy in samplers else "random"
    targs = TrainingArguments(
        output_dir=str(out / "hf"),
        per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=args.accum,
        max_steps=args.steps,
        learning_rate=args.lr,
        warmup_steps=args.warmup,
        lr_scheduler_type="cosine",
        weight_decay=args.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        bf16=args.precision == "bf16",
        use_cpu=not cuda,
        deepspeed=ds_config(args),
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        train_sampling_strategy=sampling,
        remove_unused_columns=False,  # the collator picks its columns; "length" stays
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=args.seed,
        disable_tqdm=True,
    )
    pad_id = model.config.pad_token_id or 0
    step_times: list[float] = []
    counts: list[list[float]] = []  # per step: [real tokens, sum of squared sample lengths]
    pending = [0.0, 0.0]

    class CountingTrainer(Trainer):
        def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any) -> torch.Tensor:
            batch = SimpleNamespace(input_ids=inputs["input_ids"],
                                    attention_mask=inputs.get("attention_mask"),
                                    position_ids=inputs.get("position_ids"))  # fmt: skip
            lengths = sequence_lengths(batch, pad_id).double()
            pending[0] += float(lengths.sum())
            pending[1] += float((lengths**2).sum())
            return super().training_step(model, inputs, *rest)

    class StepClock(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            step_times.append(time.time())
            counts.append(pending.copy())
            pending[:] = [0.0, 0.0]

    collator = Collator(pad_id, args.strategy)
    trainer = CountingTrainer(
        model=model, args=targs, train_dataset=train, data_collator=collator,
        callbacks=[StepClock()],
    )  # fmt: skip
    result = trainer.train()
    per_step = torch.tensor(counts, dtype=torch.float64).T.contiguous()
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    rank = tdist.get_rank() if tdist.is_initialized() else 0
    peaks = torch.zeros(world, dtype=torch.float64)
    peaks[rank] = peak
    if world > 1:
        tdist.all_reduce(per_step)
        tdist.all_reduce(peaks)
    if not args.no_save:
        trainer.save_model(str(out / "final"))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "step_times": step_times,
            "tokens_per_step": per_step[0].tolist(),
            "squares_per_step": per_step[1].tolist(),
            "peak_mem_gib": peaks.tolist(),
            "train_loss": result.training_loss,
            "threads": torch.get_num_threads(),
            "world": world,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        }
        (out / "result.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
