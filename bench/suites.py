"""The CPU benchmarks: P1 overhead, P2 vs HF Trainer, P3 checkpoint, P5 start-up, scaling.

Each suite returns plain numbers (lists: one value per repeat); `bench.run` turns them into
the table. Contenders alternate A B A B so drifting load on a shared machine hits both.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness as h
from bench.samples import fixed_samples, length_stats, sft_samples, write_jsonl
from distft.assets import TinyAssets

GLOBAL_BATCH = 16  # sequences per optimizer step in P1/P2/scaling (micro 4 x accum 2 x 2)


@dataclass
class Setup:
    root: Path
    assets: TinyAssets
    repeats: int


def distft_config(out: Path, model_dir: Path, train: Path, **sections: dict[str, Any]) -> dict:
    """distft's defaults except what a benchmark must pin (data, batch, steps, fp32 on CPU)."""
    cfg: dict[str, Any] = {
        "seed": 0,
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_files": [str(train)], "format": "tokenized", "max_seq_len": 512},
        "optim": {"lr": 3e-3, "warmup_steps": 10, "weight_decay": 0.01},
        "batch": {"micro_batch_size": 4, "grad_accum": 2, "max_steps": 100},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "cluster": {"num_workers": 2},
        "checkpoint": {"output_dir": str(out), "save_final_model": False},
        "logging": {"wandb": {"mode": "offline"}},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


# ------------------------------------------------------------------------- P1, scaling


def p1_overhead(s: Setup, steps: int = 100) -> dict[str, Any]:
    """distft vs the hand-written DeepSpeed loop: same fixed-length samples in file order
    (nothing to pad, so batching cannot differ), ZeRO-2, fp32, 2 workers x 1 thread."""
    root = s.root / "p1"
    data = write_jsonl(root / "fixed128.jsonl", fixed_samples(steps * GLOBAL_BATCH, 128, 512, 0))
    model = s.assets.model_dir
    distft_sps, hand_sps, no_ray_sps, runs = [], [], [], []
    for i in range(s.repeats):
        out = root / f"distft{i}" / "run"
        cfg = distft_config(
            out, model, data, data={"max_seq_len": 128, "batching": "padded", "shuffle": False},
            batch={"max_steps": steps},
        )  # fmt: skip
        run = h.run_distft(cfg, out.parent)
        runs.append(run)
        distft_sps.append(h.steps_per_s(run.step_times()))
        no_ray = root / f"no_ray{i}"
        cfg["checkpoint"]["output_dir"] = str(no_ray)
        path = h.write_config(cfg, no_ray)
        h.run_torchrun("bench.worker_torchrun", [str(path)], 2, no_ray / "train.log")
        no_ray_sps.append(h.steps_per_s(h.metric_rows(no_ray, "time")))
        result = root / f"hand{i}.json"
        args = ["--model", str(model), "--data", str(data), "--out", str(result),
                "--steps", str(steps)]  # fmt: skip
        h.run_torchrun("bench.ds_loop", args, 2, root / f"hand{i}.log")
        hand_sps.append(h.steps_per_s(json.loads(result.read_text())["step_times"]))
    return {"distft_sps": distft_sps, "hand_sps": hand_sps, "no_ray_sps": no_ray_sps,
            "runs": runs, "data": data}  # fmt: skip


def scaling(s: Setup, p1: dict[str, Any], steps: int = 100) -> dict[str, Any]:
    """Steps/s with 1 worker (micro 4 x accum 4) against the 2-worker P1 runs (micro 4 x
    accum 2 x 2): the same global batch of 16 sequences; distft and the hand-written loop,
    alternating. With one worker there are no collectives, so distft/hand at 1 worker
    separates the per-step cost of distft's own collectives from everything else."""
    one, hand_one = [], []
    for i in range(max(1, min(2, s.repeats))):
        out = s.root / "scaling" / f"w1_{i}" / "run"
        cfg = distft_config(
            out, s.assets.model_dir, p1["data"],
            data={"max_seq_len": 128, "batching": "padded", "shuffle": False},
            batch={"max_steps": steps, "grad_accum": 4}, cluster={"num_workers": 1},
        )  # fmt: skip
        one.append(h.steps_per_s(h.run_distft(cfg, out.parent).step_times()))
        result = s.root / "scaling" / f"hand_w1_{i}.json"
        args = ["--model", str(s.assets.model_dir), "--data", str(p1["data"]),
                "--out", str(result), "--steps", str(steps), "--accum", "4"]  # fmt: skip
        h.run_torchrun("bench.ds_loop", args, 1, s.root / "scaling" / f"hand_w1_{i}.log")
        hand_one.append(h.steps_per_s(json.loads(result.read_text())["step_times"]))
    return {"one_sps": one, "two_sps": p1["distft_sps"], "hand_one_sps": hand_one,
            "hand_two_sps": p1["hand_sps"]}  # fmt: skip


# ------------------------------------------------------------------------- P2


def calibrate_budget(lengths: np.ndarray, samples_per_unit: float) -> int:
    """distft's length-grouped micro-batch holds up to `micro x max_seq_len` padded tokens;
    the smallest max_seq_len (>= the longest sample, so nothing is cut) whose micro-batches
    hold `samples_per_unit` samples on average, i.e. the same sequences per step as HF."""
    from distft.data.packing import length_groups

    ordered = np.sort(lengths)
    target = len(lengths) / samples_per_unit
    for budget in range(int(ordered[-1]), 8 * int(ordered[-1]), 4):
        if len(length_groups(ordered, budget)) - 1 <= target:
            return budget
    raise h.BenchError("could not calibrate the length-grouped token budget")


def p2_vs_hf(
    s: Setup, steps: int = 110, hf_strategies: tuple[str, ...] = ("group_by_length",)
) -> dict[str, Any]:
    """distft's default batching vs HF Trainer + DeepSpeed on the same variable-length SFT
    samples: useful tokens/s over steps 11..N, and eval loss of the saved models."""
    from transformers import AutoTokenizer

    root = s.root / "p2"
    tok = AutoTokenizer.from_pretrained(s.assets.model_dir)
    train_rows = sft_samples(tok, 2000, seed=0)
    train = write_jsonl(root / "sft_train.jsonl", train_rows)
    evalf = write_jsonl(root / "sft_eval.jsonl", sft_samples(tok, 200, seed=1))
    lengths = np.array([len(r["input_ids"]) for r in train_rows])
    micro, accum = 4, 2  # HF: 4 sequences x 2 micro-steps x 2 ranks = 16 per step
    budget = calibrate_budget(lengths, micro)  # distft: 1 micro-batch of ~4 sequences
    res: dict[str, Any] = {"stats": length_stats(train_rows), "distft_max_seq_len": budget}
    res["distft"] = {"tok_s": [], "eval_loss": [], "tokens_per_step": []}
    for name in hf_strategies:
        res[name] = {"tok_s": [], "eval_loss": [], "tokens_per_step": []}
    for i in range(s.repeats):
        out = root / f"distft{i}" / "run"
        cfg = distft_config(
            out, s.assets.model_dir, train, data={"max_seq_len": budget},
            batch={"micro_batch_size": 1, "grad_accum": accum, "max_steps": steps},
            checkpoint={"output_dir": str(out), "save_final_model": True},
        )  # fmt: skip
        run = h.run_distft(cfg, out.parent)
        _record(res["distft"], run.step_times(), run.step_tokens(), out / "final", evalf)
        for name in hf_strategies:
            hf_out = root / f"hf_{name}{i}"
            args = ["--model", str(s.assets.model_dir), "--train", str(train),
                    "--out", str(hf_out), "--strategy", name, "--micro", str(micro),
                    "--accum", str(accum), "--steps", str(steps)]  # fmt: skip
            h.run_torchrun("bench.hf_trainer", args, 2, root / f"hf_{name}{i}.log")
            r = json.loads((hf_out / "result.json").read_text())
            _record(res[name], r["step_times"], r["tokens_per_step"], hf_out / "final", evalf)
    return res


def _record(into: dict, times: list[float], tokens: list[float], final: Path, evalf: Path):
    into["tok_s"].append(h.rate(times, tokens))
    into["tokens_per_step"].append(sum(tokens) / len(tokens))
    into["eval_loss"].append(h.eval_loss(final, evalf))
    shutil.rmtree(final, ignore_errors=True)


# ------------------------------------------------------------------------- P3


def small_model(s: Setup) -> Path:
    """A ~13M-parameter Llama (random init) so a checkpoint is ~200 MB, not 2 MB."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = s.root / "small_model"
    if (path / "config.json").is_file():
        return path
    tok = AutoTokenizer.from_pretrained(s.assets.model_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, intermediate_size=1408, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def p3_checkpoint(s: Setup, async_save: bool = False) -> dict[str, Any]:
    """Run A checkpoints every 4 steps and stops after 8 (`batch.stop_after_steps`); run B,
    the same command, resumes at 8 and runs to 16. Save time as the coordinator logs it
    (with `async_save`, until the background commit). The loop's stall: the extra time of
    the 3 steps after a save over the median step (a synchronous save stalls the first;
    a background write competes with the next ones for the cores)."""
    root = s.root / ("p3_async" if async_save else "p3")
    data = write_jsonl(root / "fixed128.jsonl", fixed_samples(256, 128, 512, 1))
    out = root / "run"
    cfg = distft_config(
        out, small_model(s), data, data={"max_seq_len": 128, "batching": "padded"},
        batch={"micro_batch_size": 2, "grad_accum": 1, "max_steps": 16, "stop_after_steps": 8},
        checkpoint={"output_dir": str(out), "every_n_steps": 4, "save_final_model": False,
                    "async_save": async_save},
    )  # fmt: skip
    a = h.run_distft(cfg, root / "a")
    b = h.run_distft(cfg, root / "b")
    gaps = {}  # step k -> time from the end of step k-1 to the end of step k, within a run
    for run in (a, b):
        times = {r["step"]: r["time"] for r in run.train_rows}
        gaps.update({k: times[k] - times[k - 1] for k in times if k - 1 in times})
    saves = [4, 12]  # 8 ends run A; 16 is the final save after the loop
    after = {k + i for k in saves for i in (1, 2, 3)}
    normal = h.median([g for k, g in gaps.items() if k not in after])
    stalls = [sum(gaps[k + i] - normal for i in (1, 2, 3)) for k in saves]
    logged = {**a.checkpoint_saves(), **b.checkpoint_saves()}
    ckpt = out / "checkpoints" / "step_00000012"
    n_bytes = h.dir_bytes(ckpt)
    dd = [h.dd_seconds(out / "dd.bin", n_bytes) for _ in range(3)]
    return {
        "bytes": n_bytes,
        "save_s": [logged[k] for k in saves if k in logged],  # as the coordinator logs it
        "stall_s": stalls,
        "dd_s": dd,
        "step_s": normal,
        "fresh_first_step_s": a.first_step_at(1),
        "resume_first_step_s": b.first_step_at(9),
        "fresh_restore_s": a.phases.get("restore+logger"),
        "resume_restore_s": b.phases.get("restore+logger"),
    }


# ------------------------------------------------------------------------- P5


def p5_startup(s: Setup, p1: dict[str, Any]) -> dict[str, Any]:
    """Launch -> first completed step of the P1 distft runs (embedded Ray, tiny model),
    split by the worker's own "ready" line; the CLI's part (`distft validate`: imports,
    config, data check) and `ray.init` are timed separately with the same config."""
    cfg_path = p1["runs"][0].log.parent / "bench-config.yaml"
    root = s.root / "p5"
    root.mkdir(parents=True, exist_ok=True)
    validate = h._run([h.DISTFT, "validate", str(cfg_path)], root / "validate.log")
    code = (
        "import time; from distft.config import load; from distft.launch.ray import init_ray\n"
        f"cfg = load({str(cfg_path)!r}); t = time.time(); init_ray(cfg)\n"
        "print('RAY_INIT', time.time() - t); import ray; ray.shutdown()"
    )
    out = subprocess.run(
        [h.PYTHON, "-c", code], capture_output=True, text=True, check=True, env=h.child_env()
    )
    ray_init = float(out.stdout.split("RAY_INIT")[1].split()[0])
    runs = p1["runs"]
    totals = [r.first_step_at(1) for r in runs]
    phases = {k: h.median([r.phases.get(k, 0.0) for r in runs]) for k in runs[0].phases}
    first_step = h.median([r.train_rows[0]["train/step_time_s"] for r in runs])
    rest = h.median(totals) - validate - ray_init - sum(phases.values()) - first_step
    return {
        "total_s": totals,
        "cli_s": validate,
        "ray_init_s": ray_init,
        "ray_train_workers_s": rest,
        "phases_s": phases,
        "first_step_s": first_step,
    }
