"""Issue 16, config and output directory: bad input gets one `error:` line naming the key
or `file:line`, exit 2, no traceback, and nothing already there is touched (the
duplicate-key YAML, overrides, unreadable config files, output_dir ownership, data paths,
eval data that is training data); a finished run rerun does nothing and says so."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from distft import __version__
from distft.rundir import MARKER
from tests.bad_input import refuse, run, snapshot
from tests.support import tiny_config, write_config


@pytest.fixture(scope="module")
def small(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 records of the tiny train set: the record checks before Ray stay fast."""
    path = tmp_path_factory.mktemp("small") / "train.jsonl"
    path.write_text("".join(tiny.train_file.read_text().splitlines(keepends=True)[:16]))
    return path


class Setup:
    """A config for one case under `tmp`: train on `small`, no eval, output `tmp/run`."""

    def __init__(self, tiny: Any, small: Path, tmp: Path):
        self.tmp, self.out = tmp, tmp / "run"
        self.cfg = tiny_config(tiny, self.out, data={"train_files": [str(small)]})
        self.cfg["data"]["eval_files"] = []

    def write(self, name: str = "c.yaml") -> Path:
        return write_config(self.tmp / name, self.cfg)

    def refuse(self, expect: str, *overrides: str, cmd: str = "train", config: Any = None) -> None:
        """`distft CMD CONFIG OVERRIDES` is refused with `expect`; nothing under tmp changes."""
        config = self.write() if config is None else config
        refuse(cmd, str(config), *overrides, expect=expect, unchanged=[self.tmp])
        assert not (self.out / MARKER).exists()  # the output directory was not taken

    def data(self, expect: str, cmd: str = "train", **values: Any) -> None:
        self.cfg["data"].update(values)
        self.refuse(expect, cmd=cmd)


@pytest.fixture
def s(tiny: Any, small: Path, tmp_path: Path) -> Setup:
    return Setup(tiny, small, tmp_path)


def reaches_ray(*args: str) -> None:
    """Every check passed: the battery's guard stops `train` where Ray would start."""
    with pytest.raises(AssertionError, match="did not happen before Ray started"):
        run("train", *args)


CASES: dict[str, Callable[[Setup], None]] = {}


def case(fn: Callable[[Setup], None]) -> Callable[[Setup], None]:
    CASES[fn.__name__] = fn
    return fn


def _edit(s: Setup, old: str, new: str) -> tuple[Path, int]:
    """The config with `old` replaced by `new`; the line where `new` starts."""
    path = s.write()
    text = path.read_text()
    path.write_text(text.replace(old, new, 1))
    return path, text[: text.index(old)].count("\n") + 1


# ----------------------------------------------------------------- the config file itself


@case
def dup_section(s: Setup) -> None:
    path = s.write()
    lines = path.read_text().splitlines()
    path.write_text(path.read_text() + "optim:\n  lr: 0.1\n")
    first, line = lines.index("optim:") + 1, len(lines) + 1
    s.refuse(f"{path}:{line}: duplicate key 'optim' (first at line {first})", config=path)


@case
def dup_key_in_section(s: Setup) -> None:
    path, at = _edit(s, "  lr: 0.003\n", "  lr: 0.003\n  warmup_steps: 1\n  lr: 0.1\n")
    s.refuse(f"{path}:{at + 2}: duplicate key 'lr' (first at line {at})", config=path)


@case
def dup_nested_key(s: Setup) -> None:
    path, at = _edit(s, "    mode: offline\n", "    mode: offline\n    mode: online\n")
    s.refuse(f"{path}:{at + 1}: duplicate key 'mode' (first at line {at})", config=path)


@case
def not_utf8(s: Setup) -> None:
    data = s.write().read_bytes()
    at = data.index(b"offline")
    (s.tmp / "c.yaml").write_bytes(data[:at] + b"\xff\xfe" + data[at:])
    s.refuse(f"{s.tmp / 'c.yaml'}: not UTF-8 text (byte {at})", config=s.tmp / "c.yaml")


@case
def config_is_a_directory(s: Setup) -> None:
    (s.tmp / "d.yaml").mkdir()
    s.refuse(f"{s.tmp / 'd.yaml'}: is a directory, not a config file", config=s.tmp / "d.yaml")


@case
def config_is_a_device(s: Setup) -> None:
    s.refuse("/dev/null: not a regular file", cmd="validate", config="/dev/null")


@case
def config_dangling_symlink(s: Setup) -> None:
    (s.tmp / "d.yaml").symlink_to(s.tmp / "gone.yaml")
    s.refuse(f"{s.tmp / 'd.yaml'}: config file not found", config=s.tmp / "d.yaml")


# ------------------------------------------------------------------------------- overrides

OVERRIDES = {
    "optim..lr=1": "override 'optim..lr=1': empty key part",
    ".lr=1": "override '.lr=1': empty key part",
    "optim.=1": "override 'optim.=1': empty key part",
    "deepspeed.ds_config={a: 1, a: 2}": "override 'deepspeed.ds_config={a: 1, a: 2}': "
    "duplicate key 'a' (first at line 1)",
}
for i, (item, expect) in enumerate(OVERRIDES.items()):
    CASES[f"override_{i}"] = lambda s, item=item, expect=expect: s.refuse(expect, item)

# ------------------------------------------------------------------------ output directory

OUTPUT_DIRS = {
    "": "checkpoint.output_dir: must not be empty",
    "  ": "checkpoint.output_dir: must not be empty",
    "/proc/distft-test/run": "checkpoint.output_dir: cannot create /proc/distft-test/run (",
    "/sys/distft-test": "checkpoint.output_dir: cannot create /sys/distft-test (",
}


def _output_dir(value: str, expect: str) -> Callable[[Setup], None]:
    def refused(s: Setup) -> None:
        s.cfg["checkpoint"]["output_dir"] = value
        s.refuse(expect)

    return refused


for i, (value, expect) in enumerate(OUTPUT_DIRS.items()):
    CASES[f"output_dir_{i}"] = _output_dir(value, expect)
CASES["output_dir_override"] = lambda s: s.refuse(
    "checkpoint.output_dir: must not be empty", "checkpoint.output_dir="
)


@case
def out_is_a_file(s: Setup) -> None:
    s.out.write_text("mine\n")
    s.refuse(f"checkpoint.output_dir: {s.out} is a file, not a directory")


@case
def out_parent_is_a_file(s: Setup) -> None:
    s.out.write_text("mine\n")
    s.cfg["checkpoint"]["output_dir"] = str(s.out / "sub")
    s.refuse(f"cannot create {s.out / 'sub'}: {s.out} is not a directory", cmd="validate")


@case
def out_dangling_symlink(s: Setup) -> None:
    s.out.symlink_to(s.tmp / "gone")
    s.refuse(f"checkpoint.output_dir: {s.out} is a dangling symlink")


@case
def out_holds_users_config(s: Setup) -> None:
    s.out.mkdir()
    path = write_config(s.out / "config.yaml", s.cfg)  # the user's own, inside output_dir
    s.refuse(f"{s.out} is not empty and not a distft run (it holds config.yaml)", config=path)


@case
def out_holds_other_files(s: Setup) -> None:
    (s.out / "notes").mkdir(parents=True)
    (s.out / "notes" / "todo.txt").write_text("x\n")
    (s.out / "results.csv").write_text("a,b\n")
    s.refuse(f"{s.out} is not empty and not a distft run (it holds notes and 1 more)")


@case
def out_checkpoints_dir_without_checkpoints(s: Setup) -> None:
    (s.out / "checkpoints").mkdir(parents=True)
    (s.out / "checkpoints" / "mine.txt").write_text("x\n")
    s.refuse(f"{s.out} is not empty and not a distft run (it holds checkpoints)", cmd="validate")


# ------------------------------------------------------------------------------------ data


@case
def cache_dir_is_a_file(s: Setup) -> None:
    (s.tmp / "cache").write_text("x\n")
    s.data(f"data.cache_dir: {s.tmp / 'cache'} is not a folder", cache_dir=str(s.tmp / "cache"))


@case
def cache_dir_parent_is_a_file(s: Setup) -> None:
    cache = s.tmp / "cache"
    cache.write_text("x\n")
    expect = f"data.cache_dir: {cache / 'c'} cannot be created: {cache} is not a folder"
    s.data(expect, cmd="validate", cache_dir=str(cache / "c"))


def _special(make: Callable[[Path], None], expect: str, cmd: str) -> Callable[[Setup], None]:
    def refused(s: Setup) -> None:
        make(s.tmp / "train.jsonl")
        s.data(
            f"data.train_files: {expect}: {s.tmp / 'train.jsonl'}",
            cmd,
            train_files=[str(s.tmp / "train.jsonl")],
        )

    return refused


def _socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


CASES["train_fifo"] = _special(os.mkfifo, "not a regular file or folder", "train")
CASES["train_socket"] = _special(_socket, "not a regular file or folder", "validate")
CASES["train_dangling_symlink"] = _special(
    lambda p: p.symlink_to(p.with_name("gone.jsonl")), "dangling symlink", "train"
)


@case
def train_folder_without_data(s: Setup) -> None:
    (s.tmp / "train.jsonl").mkdir()  # a folder named like a file
    (s.tmp / "train.jsonl" / "README.txt").write_text("x\n")
    expect = f"data.train_files: {s.tmp / 'train.jsonl'}: folder holds no"
    s.data(expect, train_files=[str(s.tmp / "train.jsonl")])


@case
def source_folder_without_data(s: Setup) -> None:
    (s.tmp / "more").mkdir()
    s.data(
        f"data.sources.0.path: {s.tmp / 'more'}: folder holds no",
        sources=[{"path": str(s.tmp / "more")}],
    )


@case
def eval_is_train(s: Setup) -> None:
    train = s.cfg["data"]["train_files"][0]
    s.data(f"data.eval_files: {train} is also training data (data.train_files)", eval_files=[train])


@case
def eval_inside_train_folder(s: Setup) -> None:
    (s.tmp / "data").mkdir()
    (s.tmp / "data" / "a.jsonl").write_text(Path(s.cfg["data"]["train_files"][0]).read_text())
    expect = f"data.eval_files: {s.tmp / 'data' / 'a.jsonl'} is also training data"
    s.data(
        expect,
        "validate",
        train_files=[str(s.tmp / "data")],
        eval_files=[str(s.tmp / "data" / "a.jsonl")],
    )


@case
def eval_symlink_to_train(s: Setup) -> None:
    (s.tmp / "eval.jsonl").symlink_to(s.cfg["data"]["train_files"][0])
    s.data("is also training data (data.train_files)", eval_files=[str(s.tmp / "eval.jsonl")])


@case
def eval_source_is_source(s: Setup) -> None:
    train = s.cfg["data"]["train_files"][0]
    # overlaps data.train_files and data.sources.0: still one line
    expect = f"data.eval_sources.0.path: {train} is also training data"
    s.data(expect, sources=[{"path": train, "weight": 0.5}], eval_sources=[{"path": train}])


@case
def eval_hub_is_train_hub(s: Setup) -> None:
    hub = {"hub": "org/some-set", "split": "train"}
    expect = "data.eval_sources.0.hub: org/some-set (split train) is also training data"
    s.data(expect, "validate", sources=[hub], eval_sources=[hub])


@pytest.mark.parametrize("name", CASES)
def test_refused_with_one_line_and_nothing_touched(name: str, s: Setup) -> None:
    CASES[name](s)


# ------------------------------------------------------------------ what is still accepted


def test_merge_keys_may_override(s: Setup) -> None:
    from distft import config as config_mod

    path = s.write()
    text = path.read_text().replace("optim:\n", "optim:\n  <<: {lr: 0.5, eps: 1.0e-6}\n", 1)
    path.write_text(text)
    cfg = config_mod.load(path)  # a key given once next to a merge is no duplicate
    assert (cfg.optim.lr, cfg.optim.eps) == (0.003, 1e-6)


def test_new_or_empty_output_dir_is_taken_and_marked(s: Setup) -> None:
    s.out.mkdir()
    reaches_ray(str(s.write()))
    marker = json.loads((s.out / MARKER).read_text())
    assert marker["distft"] == __version__ and marker["created"].endswith("Z")
    assert (s.out / "config.yaml").is_file()
    nested = s.tmp / "a" / "b" / "run"
    s.cfg["checkpoint"]["output_dir"] = str(nested)
    reaches_ray(str(s.write()))
    assert (nested / MARKER).is_file()


@pytest.mark.parametrize(
    "layout",
    [
        {"checkpoints/latest": "step_00000004"},
        {"config.yaml": "seed: 0\n", "metrics.jsonl": "{}\n"},
        {"config.yaml": "seed: 0\n", "launches.jsonl": "{}\n"},
        {"cache/x.arrow": "x"},  # data.cache_dir inside output_dir: not somebody else's
    ],
    ids=["checkpoints", "metrics", "launches", "cache_inside"],
)
def test_runs_of_an_older_distft_and_a_cache_inside_are_accepted(
    s: Setup, layout: dict[str, str]
) -> None:
    for rel, text in layout.items():
        (s.out / rel).parent.mkdir(parents=True, exist_ok=True)
        (s.out / rel).write_text(text)
    s.cfg["data"]["cache_dir"] = str(s.out / "cache")
    outcome = run("validate", str(s.write()))
    assert outcome.code == 0, outcome.stderr
    reaches_ray(str(s.tmp / "c.yaml"))
    assert (s.out / MARKER).is_file()  # adopted


# ------------------------------------------------------------------------- a finished run


def _fake_finished(s: Setup, *, final_after: bool = True, finished: bool = True) -> Path:
    """A run whose newest checkpoint records the end of the schedule (what the worker
    writes at its last save), with this config's fingerprint, and its final/."""
    from distft import config as config_mod
    from distft.checkpoint import TrainState
    from distft.checkpoint.fingerprint import fingerprint

    path = s.write()
    reaches_ray(str(path))  # takes the directory and writes the resolved config
    cfg = config_mod.load(s.out / "config.yaml")
    ckpt = s.out / "checkpoints" / "step_00000008"
    ckpt.mkdir(parents=True)
    state = TrainState(
        step=8, finished_at_step=8 if finished else None, fingerprint=fingerprint(cfg)
    )
    (ckpt / "train_state.json").write_text(json.dumps(asdict(state)))
    (ckpt / "manifest.json").write_text("{}")
    (s.out / "checkpoints" / "latest").write_text(ckpt.name)
    (s.out / "metrics.jsonl").write_text('{"step": 8}\n')
    (s.out / "final").mkdir()
    (s.out / "final" / "model.safetensors").write_text("w")
    stamp = (ckpt / "manifest.json").stat().st_mtime + (5 if final_after else -5)
    os.utime(s.out / "final", (stamp, stamp))
    return path


@pytest.mark.parametrize(
    ("final_after", "overrides"),
    [(True, []), (False, ["checkpoint.save_final_model=false"])],
    ids=["final_written", "no_final_model"],
)
def test_finished_run_rerun_does_nothing_and_says_so(
    s: Setup, final_after: bool, overrides: list[str]
) -> None:
    path = _fake_finished(s, final_after=final_after)
    before = snapshot([s.tmp])
    outcome = run("train", str(path), *overrides)
    assert outcome.code == 0, outcome.stderr
    assert outcome.stdout.strip() == (
        f"already finished: step 8 of 8 committed in {s.out} (nothing to do; use a new "
        "checkpoint.output_dir to train again)"
    )
    assert snapshot([s.tmp]) == before


@pytest.mark.parametrize(
    ("finished", "final_after", "overrides"),
    [
        (False, True, []),  # the newest checkpoint is not the end of the schedule
        (True, False, []),  # final/ is not written after it (crashed before)
        (True, True, ["checkpoint.allow_fingerprint_change=true", "optim.lr=0.01"]),
    ],
    ids=["not_finished", "final_missing", "config_changed"],
)
def test_unfinished_or_changed_run_goes_on(
    s: Setup, finished: bool, final_after: bool, overrides: list[str]
) -> None:
    path = _fake_finished(s, finished=finished, final_after=final_after)
    reaches_ray(str(path), *overrides)


@pytest.mark.slow
def test_reference_run_rerun_is_already_finished(trained: dict[str, Any]) -> None:
    """The real thing: ZeRO-2 reference run (8 steps, final/ written), rerun as trained."""
    run_ = trained["zero2_full"]
    before = snapshot([run_.out])
    outcome = run("train", str(run_.out.parent / "config.yaml"))
    assert outcome.code == 0, outcome.stderr
    assert outcome.stdout.startswith(f"already finished: step 8 of 8 committed in {run_.out}")
    assert snapshot([run_.out]) == before
