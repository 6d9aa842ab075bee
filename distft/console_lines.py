"""The text of distft's console lines, as pure functions: the progress line (rank 0 prints
it, `distft.console` redraws it on a terminal) and the end-of-run summary (the CLI's,
from the run directory)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distft.model_files import is_reward_model


def eval_loss_keys(keys: Any) -> list[str]:
    """The eval losses among metric keys, in the report's order
    (`distft.report_plots.eval_series`: `eval/loss` first, then `eval/<name>/loss` in the
    order given, the config's)."""
    from distft.report_plots import eval_series

    return [key for key, _ in eval_series([dict.fromkeys(keys)])]


def eval_label(key: str) -> str:
    """`eval/loss` -> `eval loss`, `eval/code/loss` -> `eval code loss`."""
    from distft.report_plots import eval_label as set_label

    return f"{set_label(key)} loss"


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(
    step: int, total: int, metrics: dict[str, float], elapsed: float, start: int = 0
) -> str:
    """`step 4/8  50% loss 6.0304 eval loss 5.8519 lr 2.25e-03 20,241 tok/s MFU 41.2%
    eta 3s`: eval losses only at steps that measured them, MFU only when
    `logging.peak_tflops` is known. The ETA is the mean time of the `step - start` steps
    run in `elapsed` seconds (this launch: a resumed run starts at `start`) times the
    steps left."""
    done = step / total
    eta = elapsed / (step - start) * (total - step) if step > start else 0.0
    parts = [f"step {step:>{len(str(total))}}/{total} {100 * done:3.0f}%"]
    parts.append(f"loss {metrics['train/loss']:.4f}")
    parts += [f"{eval_label(k)} {metrics[k]:.4f}" for k in eval_loss_keys(metrics)]
    parts.append(f"lr {metrics['train/lr']:.2e}")
    parts.append(f"{metrics['train/tokens_per_s']:,.0f} tok/s")
    if "train/mfu" in metrics:
        parts.append(f"MFU {100 * metrics['train/mfu']:.1f}%")
    parts.append(f"eta {duration(eta)}")
    return " ".join(parts)


ACCURACIES = ("rewards/accuracy", "logps/accuracy")


def _label(key: str) -> str:
    """`eval loss`, `eval code loss`, `eval rewards/accuracy`, `eval code logps/accuracy`."""
    for a in ACCURACIES:
        if key.endswith("/" + a):
            return f"{eval_label(key.removesuffix(a) + 'loss').removesuffix(' loss')} {a}"
    return eval_label(key)


def eval_changes(rows: list[dict[str, Any]]) -> list[str]:
    """`eval loss 6.2544 -> 5.6184` for every eval loss in the metrics rows (first
    measurement -> last; one measurement: its value alone)."""
    from distft.report import series

    logged = dict.fromkeys(k for r in rows for k in r)
    # preference objectives: each eval set's accuracies after its loss
    keys = [
        key
        for loss in eval_loss_keys(logged)
        for key in (loss, *(loss.removesuffix("loss") + a for a in ACCURACIES))
        if key in logged
    ]
    lines = []
    for key in keys:
        _, values = series(rows, key)
        if len(values) >= 2:
            lines.append(f"{_label(key)} {values[0]:.4f} -> {values[-1]:.4f}")
        elif values:
            lines.append(f"{_label(key)} {values[0]:.4f}")
    return lines


def load_snippet(final: Path) -> list[str]:
    """Three lines of Python that load the final model or LoRA adapter with plain
    transformers / peft (the tokenizer is saved beside it)."""
    path, reward = json.dumps(str(final)), is_reward_model(final)
    if (final / "adapter_config.json").is_file():
        if reward:
            return [
                "from peft import AutoPeftModelForSequenceClassification as Auto; "
                "from transformers import AutoTokenizer",
                f"tokenizer = AutoTokenizer.from_pretrained({path})",
                f"model = Auto.from_pretrained({path}, num_labels=1, "
                "pad_token_id=tokenizer.pad_token_id)  # base + adapter; logits: the reward",
            ]
        return [
            "from peft import AutoPeftModelForCausalLM; from transformers import AutoTokenizer",
            f"model = AutoPeftModelForCausalLM.from_pretrained({path})  # base + adapter",
            f"tokenizer = AutoTokenizer.from_pretrained({path})",
        ]
    cls = "AutoModelForSequenceClassification" if reward else "AutoModelForCausalLM"
    return [
        f"from transformers import {cls}, AutoTokenizer",
        f"model = {cls}.from_pretrained({path})" + ("  # logits: the reward" if reward else ""),
        f"tokenizer = AutoTokenizer.from_pretrained({path})",
    ]


def summary(run_dir: Path, wall: float, report: Path | None, log: Path | None) -> list[str]:
    """The end of a finished `distft train`: time, eval losses before -> after, where the
    final model (or adapter) is and how to load it, the report and the log file."""
    from distft.metrics import read_jsonl

    metrics = run_dir / "metrics.jsonl"
    rows = read_jsonl(metrics) if metrics.is_file() else []
    lines = [f"done in {duration(wall)}: {run_dir}"]
    lines += eval_changes(rows)
    final = run_dir / "final"
    if (final / "config.json").is_file() or (final / "adapter_config.json").is_file():
        kind = "LoRA adapter" if (final / "adapter_config.json").is_file() else "final model"
        lines.append(f"{kind}: {final}; load it with:")
        lines += [f"    {line}" for line in load_snippet(final)]
    if report is not None:
        lines.append(f"report: {report}")
    if log is not None:
        lines.append(f"log: {log}")
    return lines
