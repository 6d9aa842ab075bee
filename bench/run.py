"""`python -m bench`: distft's CPU benchmark suite against its baselines, as one table.

    python -m bench                       # everything, 3 repeats (~15 min on 2 cores)
    python -m bench --only p1,p5 --repeats 2 --out /tmp/bench

P1 overhead (vs a hand-written DeepSpeed loop), P2 (vs HF Trainer + DeepSpeed), P3
checkpoint (vs dd), P5 start-up and scaling (1 vs 2 workers). Values are medians over
the repeats with (min-max); contenders alternate A B A B. The table is Markdown, ready for
BENCHMARKS.md; `<out>/results.json` keeps every number.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness as h
from bench import suites

SUITES = ("p1", "p2", "p3", "p5", "scaling")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="work directory (default: a new temp dir)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default=",".join(SUITES), help=f"comma list of {SUITES}")
    p.add_argument("--p1-steps", type=int, default=100)
    p.add_argument("--p2-steps", type=int, default=110)
    p.add_argument(
        "--hf",
        default="group_by_length",
        help="HF strategies to run in P2 (comma list; the best one is compared)",
    )
    args = p.parse_args(argv)  # fmt: skip
    unknown = set(args.only.split(",")) - set(SUITES)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; allowed: {', '.join(SUITES)}")
    return args


def run(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    from distft.assets import build_tiny_assets

    only = set(args.only.split(","))
    root = args.out or Path(tempfile.mkdtemp(prefix="distft-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    s = suites.Setup(root, build_tiny_assets(root / "tiny"), args.repeats)
    res: dict[str, Any] = {"machine": h.machine(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    t0 = time.time()
    if only & {"p1", "p5", "scaling"}:
        res["p1"] = suites.p1_overhead(s, args.p1_steps)
    if "scaling" in only:
        res["scaling"] = suites.scaling(s, res["p1"], args.p1_steps)
    if "p5" in only:
        res["p5"] = suites.p5_startup(s, res["p1"])
    if "p2" in only:
        res["p2"] = suites.p2_vs_hf(s, args.p2_steps, tuple(args.hf.split(",")))
    if "p3" in only:
        res["p3"] = suites.p3_checkpoint(s)
        res["p3"]["async"] = suites.p3_checkpoint(s, async_save=True)
    res["wall_s"] = time.time() - t0
    if "p1" in res:
        keep = ("distft_sps", "hand_sps", "no_ray_sps")
        res["p1"] = {k: v for k, v in res["p1"].items() if k in keep}
        if "p1" not in only:
            del res["p1"]
    table = render(res)
    (root / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (root / "table.md").write_text(table + "\n")
    return table, res


def _ratio(a: list[float], b: list[float]) -> float:
    return h.median(a) / h.median(b)


def render(res: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str, str]] = []
    if "p1" in res:
        p1 = res["p1"]
        rows.append((
            "P1 overhead: steps/s (2 workers, ZeRO-2 fp32, 16 x 128-token seqs/step)",
            h.spread(p1["distft_sps"], "{:.2f}"),
            f"hand-written DeepSpeed loop {h.spread(p1['hand_sps'], '{:.2f}')}",
            f"{_ratio(p1['distft_sps'], p1['hand_sps']):.3f}", ">= 0.97",
        ))  # fmt: skip
        if p1.get("no_ray_sps"):
            rows.append((
                "P1 . the same worker under torchrun, no Ray (diagnostic): steps/s",
                h.spread(p1["no_ray_sps"], "{:.2f}"),
                f"hand-written DeepSpeed loop {h.spread(p1['hand_sps'], '{:.2f}')}",
                f"{_ratio(p1['no_ray_sps'], p1['hand_sps']):.3f}", "",
            ))  # fmt: skip
    if "p2" in res:
        rows += _p2_rows(res["p2"])
    if "p3" in res:
        p3 = res["p3"]
        mb = p3["bytes"] / 2**20
        dd = f"dd conv=fsync, same bytes {h.spread(p3['dd_s'], '{:.2f}')}"
        if p3["save_s"]:
            rows.append((
                f"P3 checkpoint save, s ({mb:.0f} MiB, 2 ranks, ~13M params, fp32 + Adam)",
                h.spread(p3["save_s"], "{:.2f}"), dd,
                f"{_ratio(p3['save_s'], p3['dd_s']):.2f}", "close to dd",
            ))  # fmt: skip
        rows.append((
            "P3 stall of the training loop during a save, s (step interval - median)",
            h.spread(p3["stall_s"], "{:.2f}"), dd,
            f"{_ratio(p3['stall_s'], p3['dd_s']):.2f}", "close to dd",
        ))  # fmt: skip
        rows.append((
            "P3 resume: launch -> first step, s (verify + load in the worker)",
            f"{p3['resume_first_step_s']:.1f} ({p3['resume_restore_s']:.2f})",
            f"fresh start {p3['fresh_first_step_s']:.1f} ({p3['fresh_restore_s']:.2f})",
            f"{p3['resume_first_step_s'] / p3['fresh_first_step_s']:.2f}", "",
        ))  # fmt: skip
        if "async" in p3:
            bg = p3["async"]
            rows.append((
                "P3 stall with checkpoint.async_save, s (3 steps after a save - 3 medians)",
                h.spread(bg["stall_s"], "{:.2f}"),
                f"synchronous save {h.spread(p3['save_s'], '{:.2f}')}",
                f"{_ratio(bg['stall_s'], p3['save_s']):.2f}", "< 0.10",
            ))  # fmt: skip
    if "p5" in res:
        p5 = res["p5"]
        rows.append(("P5 start-up: `distft train` -> first completed step, s",
                     h.spread(p5["total_s"]), "", "", ""))  # fmt: skip
        parts = [
            ("CLI: imports, config, data check", p5["cli_s"]),
            ("Ray start (ray.init)", p5["ray_init_s"]),
            ("Ray Train: controller, worker actors, process group", p5["ray_train_workers_s"]),
        ]
        parts += [(f"worker: {k}", v) for k, v in p5["phases_s"].items()]
        parts.append(("first step", p5["first_step_s"]))  # fmt: skip
        rows += [(f"P5 . {name}", f"{v:.2f}", "", "", "") for name, v in parts]
    if "scaling" in res:
        sc = res["scaling"]
        rows.append((
            "P1 overhead with 1 worker (no collectives): steps/s, 16 seqs/step",
            h.spread(sc["one_sps"], "{:.2f}"),
            f"hand-written DeepSpeed loop {h.spread(sc['hand_one_sps'], '{:.2f}')}",
            f"{_ratio(sc['one_sps'], sc['hand_one_sps']):.3f}", "",
        ))  # fmt: skip
        speedup = _ratio(sc["two_sps"], sc["one_sps"])
        hand = _ratio(sc["hand_two_sps"], sc["hand_one_sps"])
        rows.append((
            "Scaling 1 -> 2 workers: speedup at the same global batch (16 seqs)",
            f"{speedup:.2f}x ({50 * speedup:.0f}% efficiency)",
            f"hand-written loop {hand:.2f}x ({50 * hand:.0f}%)", f"{speedup / hand:.2f}", "",
        ))  # fmt: skip
    head = ("benchmark", "distft", "baseline", "distft / baseline", "goal")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _p2_rows(p2: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    names = [k for k in p2 if k not in ("stats", "distft_max_seq_len", "distft")]
    best = max(names, key=lambda k: h.median(p2[k]["tok_s"]))
    st = p2["stats"]
    d = p2["distft"]
    rows = []
    what = (f"{st['samples']} SFT samples, median {st['median']:.0f} / p90 {st['p90']:.0f} / "
            f"max {st['max']} tokens")  # fmt: skip
    for name in names:
        hf = p2[name]
        tag = "best " if name == best and len(names) > 1 else ""
        rows.append((
            f"P2 useful tokens/s vs {tag}HF Trainer `{name}` (2 ranks, ZeRO-2 fp32; {what})",
            h.spread(d["tok_s"], "{:,.0f}"), h.spread(hf["tok_s"], "{:,.0f}"),
            f"{_ratio(d['tok_s'], hf['tok_s']):.2f}x", ">= 1.2x" if name == best else "",
        ))  # fmt: skip
    hf = p2[best]
    rows.append((
        "P2 eval loss after the run (token-weighted, 200 held-out samples)",
        h.spread(d["eval_loss"], "{:.3f}"), h.spread(hf["eval_loss"], "{:.3f}"),
        f"{h.median(d['eval_loss']) - h.median(hf['eval_loss']):+.3f}", "<= baseline",
    ))  # fmt: skip
    rows.append((
        "P2 useful tokens per optimizer step (same effective batch)",
        f"{h.median(d['tokens_per_step']):,.0f}", f"{h.median(hf['tokens_per_step']):,.0f}",
        f"{_ratio(d['tokens_per_step'], hf['tokens_per_step']):.2f}", "~1",
    ))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    table, res = run(args)
    print(f"distft benchmarks: {res['machine']}; {res['date']}; {res['wall_s'] / 60:.1f} min")
    print(table)


if __name__ == "__main__":
    main()
