"""Run report: the run's metrics as PNG plots plus one self-contained HTML page.

`write_report(run_dir)` reads `metrics.jsonl`, `config.yaml`, `checkpoints/` and `final/`
and writes `report/<plot>.png` and `report.html` (plots embedded as data URIs, so the
page can be mailed or attached as one file). Plots use matplotlib's Agg canvas directly:
no display, no pyplot global state, no network.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distft.errors import UserError
from distft.metrics import read_jsonl

REPORT_DIR = "report"
PAGE = "report.html"


@dataclass(frozen=True)
class Plot:
    file: str
    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]  # (metric key, legend label)
    log_y: bool = False


PLOTS = (
    Plot("loss.png", "Loss", "mean NLL per target token",
         (("train/loss", "train"), ("eval/loss", "eval"))),
    Plot("lr.png", "Learning rate", "lr", (("train/lr", "lr"),)),
    Plot("grad_norm.png", "Gradient norm", "L2 norm",
         (("train/grad_norm", "grad norm"),), log_y=True),
    Plot("throughput.png", "Throughput", "tokens / s",
         (("train/tokens_per_s", "all tokens"), ("train/target_tokens_per_s", "target tokens"))),
)  # fmt: skip


def eval_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The eval-set losses logged: `eval/loss`, then `eval/<name>/loss` in logged order."""
    keys = dict.fromkeys(
        k for r in rows for k in r if k.startswith("eval/") and k.endswith("/loss")
    )
    return sorted(keys, key=lambda k: k != "eval/loss")


def plots(rows: list[dict[str, Any]]) -> tuple[Plot, ...]:
    """PLOTS with the loss plot showing every eval set the run logged."""
    loss, *rest = PLOTS
    named = tuple((k, k.removeprefix("eval/").removesuffix("/loss")) for k in eval_keys(rows))
    return (Plot(loss.file, loss.title, loss.ylabel, loss.series[:1] + named), *rest)


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a step logged twice (a resumed run) keeps its last
    value; non-finite values are dropped."""
    by_step: dict[int, float] = {}
    for r in rows:
        value = r.get(key)
        if isinstance(value, int | float) and value == value and abs(value) != float("inf"):
            by_step[int(r["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def render_plot(plot: Plot, rows: list[dict[str, Any]], path: Path) -> bool:
    """Write `path` if any of the plot's metrics was logged; False otherwise."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    data = [(label, *series(rows, key)) for key, label in plot.series]
    data = [(label, s, y) for label, s, y in data if s]
    if not data:
        return False
    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, steps, values in data:
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
    values = [v for _, _, ys in data for v in ys]
    if plot.log_y and min(values) > 0 and max(values) > 10 * min(values):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=plot.title, xlabel="optimizer step", ylabel=plot.ylabel)
    ax.grid(True, alpha=0.3)
    if len(data) > 1:
        ax.legend()
    fig.savefig(path, format="png")
    return True


def checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    """Committed checkpoints (those with a manifest), oldest first."""
    root = run_dir / "checkpoints"
    latest_file = root / "latest"
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    out = []
    for d in sorted(root.glob("step_*")):
        manifest = d / "manifest.json"
        if not manifest.is_file():
            continue
        try:
            files = json.loads(manifest.read_text()).get("files", {})
        except ValueError:
            files = {}
        out.append({
            "name": d.name,
            "step": int(d.name.removeprefix("step_")) if d.name[5:].isdigit() else None,
            "files": len(files),
            "size_mb": sum(f.get("size", 0) for f in files.values()) / 1e6,
            "latest": d.name == latest,
        })  # fmt: skip
    return out


def write_report(run_dir: Path) -> Path:
    """Render the plots and the page; returns the page's path."""
    run_dir = Path(run_dir)
    metrics, config = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not run_dir.is_dir() or not (metrics.is_file() or config.is_file()):
        raise UserError(f"{run_dir}: not a distft run directory (no metrics.jsonl or config.yaml)")
    try:
        rows = read_jsonl(metrics)
    except ValueError as e:
        raise UserError(f"{metrics}: not JSON lines ({e})") from None
    plots_dir = run_dir / REPORT_DIR
    plots_dir.mkdir(exist_ok=True)
    rendered = [p for p in plots(rows) if render_plot(p, rows, plots_dir / p.file)]
    page = run_dir / PAGE
    tmp = page.with_name(f".{PAGE}.tmp")
    tmp.write_text(_html(run_dir, rows, rendered, config), encoding="utf-8")
    tmp.replace(page)
    return page


def _html(run_dir: Path, rows: list[dict[str, Any]], plots: list[Plot], config: Path) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>distft report: {esc(run_dir.name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;"
        "text-align:right}pre{background:#f6f6f6;padding:1em;overflow-x:auto}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>distft run report</h1><p>{esc(str(run_dir.resolve()))}<br>generated "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>",
        "<h2>Summary</h2>",
        _summary_table(rows),
        "<h2>Metrics</h2>",
    ]
    if not plots:
        parts.append("<p>No training metrics logged yet.</p>")
    for p in plots:
        data = base64.b64encode((run_dir / REPORT_DIR / p.file).read_bytes()).decode()
        parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{esc(p.title)}" '
            f'data-file="{REPORT_DIR}/{p.file}"><figcaption>{esc(p.title)} '
            f'(<a href="{REPORT_DIR}/{p.file}">{REPORT_DIR}/{p.file}</a>)</figcaption></figure>'
        )
    parts += ["<h2>Checkpoints</h2>", _checkpoint_table(run_dir), _final(run_dir)]
    text = config.read_text(encoding="utf-8") if config.is_file() else "(no config.yaml)"
    parts += ["<h2>Resolved config</h2>", f"<pre>{esc(text)}</pre>", "</body></html>"]
    return "\n".join(parts) + "\n"


def _summary_table(rows: list[dict[str, Any]]) -> str:
    train_steps, train_loss = series(rows, "train/loss")
    _, tps = series(rows, "train/tokens_per_s")
    items = [
        ("optimizer steps logged", f"{train_steps[-1]}" if train_steps else "-"),
        ("train loss (first → last)", _arrow(train_loss)),
        *((f"{k} (first → last)", _arrow(series(rows, k)[1])) for k in eval_keys(rows)),
        ("median tokens/s", f"{sorted(tps)[len(tps) // 2]:,.0f}" if tps else "-"),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in items)
    return f"<table>{body}</table>"


def _arrow(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{values[0]:.4f}" if len(values) == 1 else f"{values[0]:.4f} → {values[-1]:.4f}"


def _checkpoint_table(run_dir: Path) -> str:
    ckpts = checkpoints(run_dir)
    if not ckpts:
        return "<p>No committed checkpoints.</p>"
    head = "<tr><th>checkpoint</th><th>step</th><th>files</th><th>MB</th><th></th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(c['name'])}</td><td>{c['step']}</td><td>{c['files']}</td>"
        f"<td>{c['size_mb']:,.1f}</td><td>{'latest' if c['latest'] else ''}</td></tr>"
        for c in ckpts
    )
    return f"<table>{head}{body}</table>"


def _final(run_dir: Path) -> str:
    final = run_dir / "final"
    if not final.is_dir():
        return "<p>No final model (<code>final/</code>) yet.</p>"
    names = sorted(p.name for p in final.iterdir() if p.is_file())
    kind = "PEFT adapter" if "adapter_config.json" in names else "Hugging Face model"
    listing = ", ".join(f"<code>{html.escape(n)}</code>" for n in names)
    return f"<p><code>final/</code>: {kind}: {listing}</p>"
