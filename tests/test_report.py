"""`distft report RUN_DIR`: PNG plots and one self-contained HTML page from a run dir.

A synthetic run directory (metrics of a resumed run with a re-logged step and a NaN,
checkpoints, a final adapter, the resolved config) is rendered through the real CLI; the
images are opened and decoded, the page is parsed and must embed exactly those images.
(The end-of-training report is checked by the e2e runs in test_export.py.)
"""

from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image

from tests.support import run_cli

PLOTS = {"loss.png", "lr.png", "grad_norm.png", "throughput.png"}


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs))
        if tag == "a":
            self.links.append(dict(attrs).get("href") or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def make_run(root: Path) -> Path:
    run = root / "run"
    rows: list[dict] = [{"step": 0, "time": 0.0, "eval/loss": 6.25}]
    for step in range(1, 21):
        rows.append(
            {
                "step": step,
                "time": float(step),
                "train/loss": 6.0 - 0.1 * step,
                "train/lr": 1e-3 * min(1.0, step / 5),
                "train/grad_norm": float("nan") if step == 7 else 2.0 / step,
                "train/tokens_per_s": 1000.0 + step,
                "train/target_tokens_per_s": 300.0 + step,
            }
        )
        if step % 10 == 0:
            rows.append({"step": step, "time": float(step), "eval/loss": 6.0 - 0.1 * step})
    assert rows[12]["step"] == 11
    rows.insert(12, dict(rows[12], **{"train/loss": 99.0}))  # logged, then redone on resume
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.yaml").write_text("model:\n  name_or_path: /models/<tiny>\nseed: 0\n")
    for step in (10, 20):
        ckpt = run / "checkpoints" / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        files = {"a.pt": {"size": 2_000_000, "xxh3_128": "0"}, "b.pt": {"size": 500_000}}
        (ckpt / "manifest.json").write_text(json.dumps({"step": step, "files": files}))
    (run / "checkpoints" / ".partial" / "step_00000030").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000020")
    (run / "final").mkdir()
    (run / "final" / "adapter_config.json").write_text("{}")
    return run


def test_report_renders_valid_pngs_and_one_page_embedding_them(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    proc = run_cli("report", str(run))
    assert proc.returncode == 0, proc.stderr
    page_path = run / "report.html"
    assert proc.stdout.strip() == f"report: {page_path}"
    files = {p.name: p for p in (run / "report").glob("*.png")}
    assert set(files) == PLOTS
    for path in files.values():
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()  # decodes every pixel
            assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 200
            darkest, brightest = im.convert("L").getextrema()
            assert brightest - darkest > 100  # not a blank canvas

    page = Page()
    page.feed(page_path.read_text(encoding="utf-8"))
    page.close()
    assert len(page.images) == len(PLOTS)
    for img in page.images:
        src, name = img["src"] or "", Path(img["data-file"] or "").name
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == files[name].read_bytes()
        assert f"report/{name}" in page.links
    text = " ".join(page.text)
    assert "/models/<tiny>" in text  # the config, escaped and shown as text
    assert "step_00000010" in text and "step_00000020" in text and "latest" in text
    assert "step_00000030" not in text  # uncommitted
    assert "PEFT adapter" in text
    assert "6.2500 → 4.0000" in text  # eval loss first -> last


def test_report_series_keeps_the_last_value_of_a_relogged_step(tmp_path: Path) -> None:
    from distft.metrics import read_jsonl
    from distft.report import series

    rows = read_jsonl(make_run(tmp_path) / "metrics.jsonl")
    steps, losses = series(rows, "train/loss")
    assert steps == list(range(1, 21)) and 99.0 not in losses
    steps, norms = series(rows, "train/grad_norm")
    assert 7 not in steps and all(math.isfinite(v) for v in norms)


def test_report_without_metrics_still_writes_a_page(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 1\n")
    proc = run_cli("report", str(run))
    assert proc.returncode == 0, proc.stderr
    html = (run / "report.html").read_text()
    assert "No training metrics logged yet" in html and "No committed checkpoints" in html
    assert not list((run / "report").glob("*.png"))


def test_report_on_a_non_run_dir_is_one_line_exit_2(tmp_path: Path) -> None:
    for path in (tmp_path / "missing", tmp_path):
        proc = run_cli("report", str(path))
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "not a distft run directory" in lines[0], proc.stderr
