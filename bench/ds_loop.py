"""The P1 baseline: the minimal DeepSpeed training loop a user would write by hand.

Same model files, same pre-tokenized samples (in file order, rank r taking the r-th
contiguous slice of each global batch, as distft does with `data.shuffle: false`), same
ZeRO settings, optimizer (AdamW, weight decay on >= 2-D weights only: two parameter
groups) and lr schedule (warmup + cosine, stepped by DeepSpeed) as distft's generated
config: what a careful hand-written fine-tuning loop does. No metrics beyond a timestamp
per step. Run under torchrun, one process per worker:

    python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \
        -m bench.ds_loop --model M --data T.jsonl --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: import siblings as `bench.*`, never top-level
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.samples import read_jsonl  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    import deepspeed
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--print-pid", action="store_true", help="for bench.where_time_goes: at step 20")
    args = p.parse_args(argv)

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    rows = read_jsonl(Path(args.data))
    ids = torch.tensor([r["input_ids"] for r in rows])
    labels = torch.tensor([r["labels"] for r in rows])
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup, args.steps)
    config = {
        "train_micro_batch_size_per_gpu": args.micro,
        "gradient_accumulation_steps": args.accum,
        "train_batch_size": args.micro * args.accum * world,
        "gradient_clipping": 1.0,
        "steps_per_print": 2**31 - 1,
        "zero_optimization": {
            "stage": args.zero,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": 500_000_000,
            "allgather_bucket_size": 500_000_000,
        },
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=config
    )
    engine.train()

    per_rank, global_batch = args.micro * args.accum, args.micro * args.accum * world
    step_times = []
    for step in range(args.steps):
        first = (step * global_batch) % len(rows) + rank * per_rank
        for j in range(args.accum):
            sl = slice(first + j * args.micro, first + (j + 1) * args.micro)
            loss = engine(input_ids=ids[sl], labels=labels[sl]).loss
            engine.backward(loss)
            engine.step()
        step_times.append(time.time())
        if args.print_pid and rank == 0 and step + 1 == 20:
            print(f"RANK0_PID {os.getpid()} step 20", flush=True)
    if rank == 0:
        record = {"step_times": step_times, "threads": torch.get_num_threads(), "world": world}
        Path(args.out).write_text(json.dumps(record))


if __name__ == "__main__":
    main()
