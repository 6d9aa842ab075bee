"""The report's plots: which metrics each one shows, their series from `metrics.jsonl`
rows, and PNG rendering with matplotlib's Agg canvas (no display, no pyplot state).

One run: each plot's metrics in their own colour (`PLOTS`). Several runs (`COMPARE`): one
colour per run, named in the legend; where a plot shows several metrics of each run (the
eval sets), each metric has its own line style in every run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Rows = list[dict[str, Any]]
LOSS_LABEL = "mean NLL per target token"
_EVAL_KEY = re.compile(r"eval/(?:(?P<name>.+)/)?loss")
_STYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class Plot:
    file: str
    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]  # (metric key, legend label)
    evals: bool = False  # also every eval set's loss: eval/loss, eval/<name>/loss
    log_y: bool = False


PLOTS = (
    Plot("loss.png", "Loss", LOSS_LABEL, (("train/loss", "train"),), evals=True),
    Plot("lr.png", "Learning rate", "lr", (("train/lr", "lr"),)),
    Plot("grad_norm.png", "Gradient norm", "L2 norm",
         (("train/grad_norm", "grad norm"),), log_y=True),
    Plot("throughput.png", "Throughput", "tokens / s",
         (("train/tokens_per_s", "all tokens"), ("train/target_tokens_per_s", "target tokens"))),
    # preference objectives and reward models (distft.objectives); absent from SFT runs
    Plot("rewards.png", "Rewards", "reward",
         (("train/rewards/chosen", "chosen"), ("train/rewards/rejected", "rejected"),
          ("train/rewards/margins", "margin"))),
    Plot("preference_accuracy.png", "Preference accuracy", "fraction of pairs",
         (("train/rewards/accuracy", "train rewards"), ("eval/rewards/accuracy", "eval rewards"),
          ("train/logps/accuracy", "train log-probs"), ("eval/logps/accuracy", "eval log-probs"))),
    Plot("logps.png", "Policy log-probs", "summed log-prob",
         (("train/logps/chosen", "chosen"), ("train/logps/rejected", "rejected"))),
)  # fmt: skip

COMPARE = (
    Plot("train_loss.png", "Train loss", LOSS_LABEL, (("train/loss", "train"),)),
    Plot("eval_loss.png", "Eval loss", LOSS_LABEL, (), evals=True),
    Plot("throughput.png", "Throughput", "tokens / s", (("train/tokens_per_s", "tokens/s"),)),
    Plot("lr.png", "Learning rate", "lr", (("train/lr", "lr"),)),
)


@dataclass(frozen=True)
class Line:
    label: str
    steps: list[int]
    values: list[float]
    colour: int
    style: int = 0


def series(rows: Rows, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a step logged twice (a resumed run) keeps its last
    value; non-finite values are dropped."""
    by_step: dict[int, float] = {}
    for r in rows:
        value = r.get(key)
        if isinstance(value, int | float) and value == value and abs(value) != float("inf"):
            by_step[int(r["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def eval_series(rows: Rows) -> list[tuple[str, str]]:
    """(key, label) of every eval set's loss that was logged: `eval/loss` ("eval") first,
    then `eval/<name>/loss` ("eval <name>") in the order logged (the config's)."""
    keys = dict.fromkeys(k for r in rows for k in r if _EVAL_KEY.fullmatch(k))
    return [(k, eval_label(k)) for k in sorted(keys, key=lambda k: k != "eval/loss")]


def eval_label(key: str) -> str:
    m = _EVAL_KEY.fullmatch(key)
    return f"eval {m['name']}" if m and m["name"] else "eval"


def metrics_of(plot: Plot, rows: Rows) -> list[tuple[str, str]]:
    return [*plot.series, *(eval_series(rows) if plot.evals else [])]


def lines(plot: Plot, runs: list[tuple[str, Rows]]) -> list[Line]:
    """The plot's lines. One run: a colour per metric. Several: a colour per run, a line
    style per metric; labels name the run (and the metric, when the plot has several)."""
    if len(runs) == 1:
        found = [(label, *series(runs[0][1], key)) for key, label in metrics_of(plot, runs[0][1])]
        return [Line(lbl, s, v, i) for i, (lbl, s, v) in enumerate(x for x in found if x[1])]
    keys: list[str] = []
    labels: dict[str, str] = {}
    for _, rows in runs:
        for key, label in metrics_of(plot, rows):
            if key not in labels:
                keys.append(key)
                labels[key] = label
    out = []
    for colour, (name, rows) in enumerate(runs):
        for key in keys:
            steps, values = series(rows, key)
            if steps:
                label = name if len(keys) == 1 else f"{name}: {labels[key]}"
                out.append(Line(label, steps, values, colour, keys.index(key)))
    return out


def render(plot: Plot, data: list[Line], path: Path, legend: bool) -> bool:
    """Write `path` if there is any line; False otherwise."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not data:
        return False
    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for line in data:
        ax.plot(
            line.steps,
            line.values,
            color=f"C{line.colour % 10}",
            linestyle=_STYLES[line.style % len(_STYLES)],
            marker="o" if len(line.steps) < 30 else None,
            markersize=3,
            label=line.label,
        )
    values = [v for line in data for v in line.values]
    if plot.log_y and min(values) > 0 and max(values) > 10 * min(values):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=plot.title, xlabel="optimizer step", ylabel=plot.ylabel)
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize="small")
    fig.savefig(path, format="png")
    return True
