"""`distft report RUN_A RUN_B ... --out DIR`: several runs overlaid on one page.

The plots of `report_plots.COMPARE` (train loss, every eval set's loss, tokens/s and the
learning rate against the optimizer step), one colour per run with its name in the legend,
and a table of each run's final figures. A run is named by the shortest tail of its path
that tells it from the others (`a/run`, `b/run`). The page goes to `DIR/report.html`,
its PNGs to `DIR/report/`; DIR must be new, empty or a comparison written before, and
none of the runs.
"""

from __future__ import annotations

import html
from pathlib import Path

from distft.errors import UserError
from distft.report import (
    PAGE,
    REPORT_DIR,
    figures,
    final_kind,
    generated,
    head,
    median_tokens_per_s,
    read_run,
    write_page,
)
from distft.report_plots import COMPARE, Rows, eval_series, lines, render, series

DEFAULT_OUT = Path("distft-report")


def run_names(run_dirs: list[Path]) -> list[str]:
    """The shortest path tails that differ between the runs."""
    parts = [d.resolve().parts for d in run_dirs]
    for n in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in run_dirs]  # unreachable for distinct paths


def check_out(out: Path, run_dirs: list[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file, not a directory")
    if any(out.resolve() == d.resolve() for d in run_dirs):
        raise UserError(f"--out: {out} is one of the runs; choose another directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in (PAGE, REPORT_DIR))
        if foreign:
            raise UserError(f"--out: {out} holds other files ({', '.join(foreign[:3])}); "
                            "choose a new or empty directory")  # fmt: skip


def write_comparison(run_dirs: list[Path], out: Path = DEFAULT_OUT) -> Path:
    """Render the overlaid plots and the page into `out`; returns the page's path."""
    seen: set[Path] = set()
    problems = []
    for d in run_dirs:
        if d.resolve() in seen:
            problems.append(f"{d}: given twice")
        seen.add(d.resolve())
    runs: list[tuple[str, Rows]] = []
    names = run_names(run_dirs)
    for name, d in zip(names, run_dirs, strict=True):
        try:
            runs.append((name, read_run(d)))
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise UserError("\n".join(problems))
    check_out(out, run_dirs)
    (out / REPORT_DIR).mkdir(parents=True, exist_ok=True)
    rendered = []
    for p in COMPARE:
        if render(p, lines(p, runs), out / REPORT_DIR / p.file, legend=True):
            rendered.append(p)
        else:  # not left over from an earlier comparison in the same folder
            (out / REPORT_DIR / p.file).unlink(missing_ok=True)
    esc = html.escape
    parts = [
        *head(f"distft comparison: {', '.join(name for name, _ in runs)}"),
        f"<h1>distft runs compared</h1><p>{generated()}</p>",
        "<h2>Final figures</h2>",
        _final_table(runs, run_dirs),
        "<h2>Metrics</h2>",
        *(figures(out, rendered) or ["<p>No training metrics logged yet.</p>"]),
        "<h2>Runs</h2><ul>",
        *(
            f"<li>{esc(n)}: {esc(str(d.resolve()))}</li>"
            for n, d in zip(names, run_dirs, strict=True)
        ),
        "</ul></body></html>",
    ]
    return write_page(out, "\n".join(parts) + "\n")


def _final_table(runs: list[tuple[str, Rows]], run_dirs: list[Path]) -> str:
    """One row per run: its last step, the last value of each loss, median tokens/s and
    the kind of final model."""
    evals: list[tuple[str, str]] = []
    for _, rows in runs:
        evals += [e for e in eval_series(rows) if e not in evals]
    evals = evals or [("eval/loss", "eval")]
    columns = ["run", "steps", "train loss", *(f"{label} loss" for _, label in evals)]
    columns += ["median tokens/s", "final/"]
    body = []
    for (name, rows), run_dir in zip(runs, run_dirs, strict=True):
        steps, _ = series(rows, "train/loss")
        cells = [name, str(steps[-1]) if steps else "-", _last(rows, "train/loss")]
        cells += [_last(rows, key) for key, _ in evals]
        cells += [median_tokens_per_s(rows), final_kind(run_dir) or "-"]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    return f"<table>{header}{''.join(body)}</table>"


def _last(rows: Rows, key: str) -> str:
    _, values = series(rows, key)
    return f"{values[-1]:.4f}" if values else "-"
