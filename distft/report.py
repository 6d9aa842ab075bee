"""Run report: the run's metrics as PNG plots plus one self-contained HTML page.

`write_report(run_dir)` reads `metrics.jsonl`, `config.yaml`, `checkpoints/` and `final/`
and writes `report/<plot>.png` and `report.html` (plots embedded as data URIs, so the
page can be mailed or attached as one file). `write_comparison(run_dirs, out)` overlays
several runs on one page (`distft/report_compare.py`). The plots: `distft/report_plots.py`.
"""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distft.errors import UserError
from distft.metrics import read_jsonl
from distft.report_plots import PLOTS, Plot, Rows, eval_series, lines, render, series

__all__ = ["read_run", "series", "write_report"]

REPORT_DIR = "report"
PAGE = "report.html"


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


def read_run(run_dir: Path) -> Rows:
    """The run's metrics rows ([] before the first is logged); UserError for a folder that
    is no run or a metrics file that is not JSON lines."""
    metrics, config = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not run_dir.is_dir() or not (metrics.is_file() or config.is_file()):
        raise UserError(f"{run_dir}: not a distft run directory (no metrics.jsonl or config.yaml)")
    try:
        return read_jsonl(metrics)
    except ValueError as e:
        raise UserError(f"{metrics}: not JSON lines ({e})") from None


def write_report(run_dir: Path) -> Path:
    """Render the plots and the page into the run directory; returns the page's path."""
    run_dir = Path(run_dir)
    rows = read_run(run_dir)
    plots_dir = run_dir / REPORT_DIR
    plots_dir.mkdir(exist_ok=True)
    rendered = []
    for p in PLOTS:
        data = lines(p, [(run_dir.name, rows)])
        if render(p, data, plots_dir / p.file, legend=len(data) > 1):
            rendered.append(p)
    return write_page(run_dir, _html(run_dir, rows, rendered, run_dir / "config.yaml"))


def write_page(out: Path, text: str) -> Path:
    page = out / PAGE
    tmp = page.with_name(f".{PAGE}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(page)
    return page


def figures(out: Path, plots: list[Plot]) -> list[str]:
    """Each rendered plot as an embedded image with a link to its PNG file."""
    esc, parts = html.escape, []
    for p in plots:
        data = base64.b64encode((out / REPORT_DIR / p.file).read_bytes()).decode()
        parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{esc(p.title)}" '
            f'data-file="{REPORT_DIR}/{p.file}"><figcaption>{esc(p.title)} '
            f'(<a href="{REPORT_DIR}/{p.file}">{REPORT_DIR}/{p.file}</a>)</figcaption></figure>'
        )
    return parts


def head(title: str) -> list[str]:
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;"
        "text-align:right}pre{background:#f6f6f6;padding:1em;overflow-x:auto}"
        "img{max-width:100%}</style></head><body>",
    ]


def generated() -> str:
    return f"generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"


def _html(run_dir: Path, rows: Rows, plots: list[Plot], config: Path) -> str:
    esc = html.escape
    parts = [
        *head(f"distft report: {run_dir.name}"),
        f"<h1>distft run report</h1><p>{esc(str(run_dir.resolve()))}<br>{generated()}</p>",
        "<h2>Summary</h2>",
        _summary_table(rows),
        "<h2>Metrics</h2>",
    ]
    if not plots:
        parts.append("<p>No training metrics logged yet.</p>")
    parts += figures(run_dir, plots)
    parts += ["<h2>Checkpoints</h2>", _checkpoint_table(run_dir), _final(run_dir)]
    text = config.read_text(encoding="utf-8") if config.is_file() else "(no config.yaml)"
    parts += ["<h2>Resolved config</h2>", f"<pre>{esc(text)}</pre>", "</body></html>"]
    return "\n".join(parts) + "\n"


def _summary_table(rows: Rows) -> str:
    train_steps, train_loss = series(rows, "train/loss")
    evals = [(f"{label} loss (first → last)", series(rows, key)[1]) for key, label in
             eval_series(rows)] or [("eval loss (first → last)", [])]  # fmt: skip
    items = [
        ("optimizer steps logged", f"{train_steps[-1]}" if train_steps else "-"),
        ("train loss (first → last)", _arrow(train_loss)),
        *((name, _arrow(values)) for name, values in evals),
        ("median tokens/s", median_tokens_per_s(rows)),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in items)
    return f"<table>{body}</table>"


def median_tokens_per_s(rows: Rows) -> str:
    _, tps = series(rows, "train/tokens_per_s")
    return f"{sorted(tps)[len(tps) // 2]:,.0f}" if tps else "-"


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


def final_kind(run_dir: Path) -> str | None:
    """ "PEFT adapter" or "Hugging Face model" for a run with `final/`, else None."""
    final = run_dir / "final"
    if not final.is_dir():
        return None
    return "PEFT adapter" if (final / "adapter_config.json").is_file() else "Hugging Face model"


def _final(run_dir: Path) -> str:
    kind = final_kind(run_dir)
    if kind is None:
        return "<p>No final model (<code>final/</code>) yet.</p>"
    names = sorted(p.name for p in (run_dir / "final").iterdir() if p.is_file())
    listing = ", ".join(f"<code>{html.escape(n)}</code>" for n in names)
    return f"<p><code>final/</code>: {kind}: {listing}</p>"
