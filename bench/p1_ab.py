"""P1 under torchrun for two checkouts in one run: distft's own loop
(`bench.worker_torchrun`, no Ray) of `--base` (another checkout, e.g. the commit before
a change) and of this one, each against the hand-written DeepSpeed loop, on P1's data and
config (`bench.suites.p1_overhead`). The three alternate base, this, hand in every repeat,
so a shared machine's drifting load hits all of them; the ratios are medians of steps/s.
The Ray row stays `python -m bench --only p1`.

    git worktree add /tmp/base <commit>
    python -m bench.p1_ab --base /tmp/base --repeats 3 --out /tmp/p1ab
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench import harness as h
from bench.samples import fixed_samples, write_jsonl
from bench.suites import GLOBAL_BATCH, distft_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.p1_ab", description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True, help="the other checkout")
    p.add_argument("--out", type=Path, help="work directory (default: a new temp dir)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args(argv)
    from distft.assets import build_tiny_assets

    root = args.out or Path(tempfile.mkdtemp(prefix="distft-p1ab-"))
    model = build_tiny_assets(root / "tiny").model_dir
    data = write_jsonl(
        root / "fixed128.jsonl", fixed_samples(args.steps * GLOBAL_BATCH, 128, 512, 0)
    )
    sps: dict[str, list[float]] = {"base": [], "this": [], "hand": []}
    load = h.machine()
    for i in range(args.repeats):
        for name, checkout in (("base", args.base.resolve()), ("this", h.REPO)):
            out = root / f"{name}{i}"
            cfg = distft_config(
                out, model, data, data={"max_seq_len": 128, "batching": "padded", "shuffle": False},
                batch={"max_steps": args.steps},
            )  # fmt: skip
            path = h.write_config(cfg, out)
            h.run_torchrun("bench.worker_torchrun", [str(path)], 2, out / "train.log", checkout)
            sps[name].append(h.steps_per_s(h.metric_rows(out, "time")))
        result = root / f"hand{i}.json"
        hand = ["--model", str(model), "--data", str(data), "--out", str(result),
                "--steps", str(args.steps)]  # fmt: skip
        h.run_torchrun("bench.ds_loop", hand, 2, root / f"hand{i}.log")
        sps["hand"].append(h.steps_per_s(json.loads(result.read_text())["step_times"]))
    hand_median = h.median(sps["hand"])
    print(f"{load}; {args.repeats} repeats of {args.steps} steps")
    print("| distft's loop under torchrun | steps/s | hand-written loop | P1 |")
    print("|---|---|---|---|")
    for name in ("base", "this"):
        ratio = h.median(sps[name]) / hand_median
        print(f"| {name} | {h.spread(sps[name], '{:.2f}')} | "
              f"{h.spread(sps['hand'], '{:.2f}')} | {ratio:.3f} |")  # fmt: skip
    (root / "p1_ab.json").write_text(json.dumps(sps, indent=1))


if __name__ == "__main__":
    main()
