"""`distft report RUN_A RUN_B ... --out DIR`: several runs on one page, through the real
CLI on metrics files written here (and once on two of the session's trained runs).

The PNGs are decoded and searched for each run's colour (matplotlib's C0, C1, ...); the
page is parsed: it embeds exactly its PNGs and its table holds each run's last values.
"""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.reference_runs import TrainedRun
from tests.support import read_metrics, run_cli

COMPARE = {"train_loss.png", "eval_loss.png", "throughput.png", "lr.png"}
RUN_COLOURS = [(0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)]  # matplotlib C0 (blue), C1 (orange)


class Page(HTMLParser):
    """The page's images and its tables as rows of cell texts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.rows: list[list[str]] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def write_run(path: Path, rows: list[dict[str, Any]], final: str | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.yaml").write_text("seed: 0\n")
    if final:
        (path / "final").mkdir()
        (path / "final" / final).write_text("{}")
    return path


def metrics(loss0: float, tps: float, named_eval: bool, steps: int = 10) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{"step": 0, "time": 0.0, "eval/loss": loss0}]
    for s in range(1, steps + 1):
        rows.append({"step": s, "time": float(s), "train/loss": loss0 - 0.1 * s,
                     "train/lr": 1e-3, "train/tokens_per_s": tps + s})  # fmt: skip
        if s % 5 == 0:
            evals = {"eval/loss": loss0 - 0.2 * s}
            if named_eval:
                evals["eval/chat/loss"] = loss0 - 0.3 * s
            rows.append({"step": s, "time": float(s), **evals})
    return rows


def colours_in(path: Path) -> set[tuple[int, int, int]]:
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 200
        return {c for _, c in im.convert("RGB").getcolors(maxcolors=1 << 20) or []}


def test_report_of_two_runs_overlays_them_with_a_table_of_final_figures(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a" / "run", metrics(6.0, 1000.0, named_eval=True), "config.json")
    b = write_run(tmp_path / "b" / "run", metrics(5.0, 2000.0, named_eval=False, steps=12),
                  "adapter_config.json")  # fmt: skip
    out = tmp_path / "cmp"
    proc = run_cli("report", str(a), str(b), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"report: {out / 'report.html'}"
    files = {p.name: p for p in (out / "report").glob("*.png")}
    assert set(files) == COMPARE
    for path in files.values():  # every plot draws both runs, each in its own colour
        assert set(RUN_COLOURS) <= colours_in(path), path.name
    assert not (a / "report.html").exists()  # the runs are only read

    page = Page((out / "report.html").read_text(encoding="utf-8"))
    assert len(page.images) == len(COMPARE)
    for img in page.images:
        name = Path(img["data-file"] or "").name
        assert base64.b64decode((img["src"] or "").split(",", 1)[1]) == files[name].read_bytes()
    header, *body = page.rows
    assert header == ["run", "steps", "train loss", "eval loss", "eval chat loss",
                      "median tokens/s", "final/"]  # fmt: skip
    assert body == [
        ["a/run", "10", "5.0000", "4.0000", "3.0000", "1,006", "Hugging Face model"],
        ["b/run", "12", "3.8000", "3.0000", "-", "2,007", "PEFT adapter"],
    ]  # last values: 6.0 - 0.1*10, eval at step 10: 6.0 - 0.2*10, 6.0 - 0.3*10 ...

    # The same folder again, for runs that logged no eval: no eval plot left behind
    no_eval = [{k: v for k, v in r.items() if "eval" not in k} for r in metrics(4, 9, False)]
    c = write_run(tmp_path / "c", no_eval)
    d = write_run(tmp_path / "d", no_eval)
    assert run_cli("report", str(c), str(d), "--out", str(out)).returncode == 0
    assert {p.name for p in (out / "report").glob("*.png")} == COMPARE - {"eval_loss.png"}
    assert len(Page((out / "report.html").read_text(encoding="utf-8")).images) == 3


def test_comparison_lines_a_colour_per_run_a_style_per_eval_set() -> None:
    from distft.report_plots import COMPARE as PLOTS
    from distft.report_plots import lines

    runs = [("a", metrics(6.0, 1.0, True)), ("b", metrics(5.0, 1.0, False))]
    by_file = {p.file: lines(p, runs) for p in PLOTS}
    got = [(x.label, x.colour, x.style, x.steps) for x in by_file["eval_loss.png"]]
    assert got == [
        ("a: eval", 0, 0, [0, 5, 10]),
        ("a: eval chat", 0, 1, [5, 10]),
        ("b: eval", 1, 0, [0, 5, 10]),
    ]
    assert [(x.label, x.colour) for x in by_file["train_loss.png"]] == [("a", 0), ("b", 1)]
    # One run: as `distft report RUN`, a colour per metric, every eval set in the loss plot
    from distft.report_plots import PLOTS as SINGLE

    loss = lines(SINGLE[0], runs[:1])
    assert [(x.label, x.colour) for x in loss] == [("train", 0), ("eval", 1), ("eval chat", 2)]


def test_one_run_report_shows_every_eval_set(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", metrics(6.0, 1000.0, named_eval=True))
    proc = run_cli("report", str(run))
    assert proc.returncode == 0, proc.stderr
    page = Page((run / "report.html").read_text(encoding="utf-8"))
    summary = {row[0]: row[1] for row in page.rows if len(row) == 2}
    assert summary["eval loss (first → last)"] == "6.0000 → 4.0000"
    assert summary["eval chat loss (first → last)"] == "4.5000 → 3.0000"
    assert (0x2C, 0xA0, 0x2C) in colours_in(run / "report" / "loss.png")  # C2: eval chat


def test_report_of_several_runs_bad_input_is_one_line_each_exit_2(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", metrics(6.0, 1.0, False))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    cases = [
        ((str(a), str(tmp_path / "nope"), str(tmp_path / "gone")),
         [f"{tmp_path / 'nope'}: not a distft run", f"{tmp_path / 'gone'}: not a distft run"]),
        ((str(a), str(a)), [f"{a}: given twice"]),
        ((str(a), str(a), "--out", str(a)), [f"{a}: given twice"]),
        ((str(a), "--out", str(a)), [f"--out: {a} is one of the runs"]),
        ((str(a), "--out", str(tmp_path / "mine")), [f"--out: {tmp_path / 'mine'} holds other"]),
    ]  # fmt: skip
    for args, want in cases:
        proc = run_cli("report", *args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == len(want), proc.stderr
        for line, start in zip(lines, want, strict=True):
            assert line.startswith(f"error: {start}"), line
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert not (a / "report.html").exists() and not (tmp_path / "distft-report").exists()


@pytest.mark.slow
def test_report_of_two_trained_runs(trained: dict[str, TrainedRun], tmp_path: Path) -> None:
    runs = [trained["zero2_full"].out, trained["zero3_lora"].out]
    proc = run_cli("report", *map(str, runs), cwd=tmp_path)  # default --out: ./distft-report
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "distft-report"
    assert {p.name for p in (out / "report").glob("*.png")} == COMPARE
    _, *body = Page((out / "report.html").read_text(encoding="utf-8")).rows
    assert [row[0] for row in body] == ["zero2_full/run", "zero3_lora/run"]
    for row, run in zip(body, runs, strict=True):
        rows = read_metrics(run)
        train = [r["train/loss"] for r in rows if "train/loss" in r]
        evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
        assert row[1:4] == [str(run_steps(rows)), f"{train[-1]:.4f}", f"{evals[-1]:.4f}"]
    assert [row[-1] for row in body] == ["Hugging Face model", "PEFT adapter"]


def run_steps(rows: list[dict[str, Any]]) -> int:
    return max(r["step"] for r in rows if "train/loss" in r)
