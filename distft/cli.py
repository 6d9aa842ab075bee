"""The `distft` command. Bad input prints one line per problem and exits 2; a failed
training run exits 1 with the worker's error."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import typer
from rich.console import Console

from distft import config as config_mod
from distft import rundir
from distft.checkpoint import preempt
from distft.errors import UserError

if TYPE_CHECKING:
    from distft.console import RunConsole
    from distft.launch.ray import TrainingFailed

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

T = TypeVar("T")
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1

CONFIG_ARG = typer.Argument(..., help="Run config (YAML).", show_default=False)
OVERRIDES_ARG = typer.Argument(None, help="Overrides: section.key=value ...")


def _fail(lines: list[str], code: int) -> NoReturn:
    for line in lines:
        err.print(f"error: {line}", markup=False)
    raise typer.Exit(code)


def _load(config: Path, overrides: list[str] | None, *, train: bool) -> config_mod.Config:
    try:
        cfg = config_mod.resolve_paths(config_mod.load(config, overrides or []))
        _check_model_files(cfg)
        _check_data(cfg)
        return _check_model(cfg, train)
    except UserError as e:
        _fail(str(e).splitlines(), EXIT_BAD_INPUT)


def _check_model(cfg: config_mod.Config, train: bool) -> config_mod.Config:
    """The model's architecture, from its config alone: `attn_implementation: auto` made
    concrete (so the data layer and config.yaml see the implementation that runs) and the
    LoRA targets checked. `validate` reads only local files; `train` may fetch the config
    of a hub model, as its workers will."""
    from distft.model import check_model

    resolved, lines = check_model(cfg, local_only=not train)
    for line in lines:
        err.print(line, markup=False)
    return resolved or cfg


def _refuse_user_error(check: Callable[[T], None], arg: T) -> None:
    try:
        check(arg)
    except UserError as e:
        _fail(str(e).splitlines(), EXIT_BAD_INPUT)


def _check_output_dir(cfg: config_mod.Config) -> None:
    """Missing, empty or a distft run (distft.rundir): never somebody else's files."""
    _refuse_user_error(rundir.check, cfg)


def _check_resume(cfg: config_mod.Config) -> None:
    """What the workers would refuse about resuming, found before Ray starts."""
    from distft.checkpoint import check_before_launch

    _refuse_user_error(check_before_launch, cfg)


def _check_model_files(cfg: config_mod.Config) -> None:
    """Local model and tokenizer folders, from their files (config, weight headers,
    tokenizer files; no weights read): before the data checks, which use the tokenizer."""
    from distft.model_files import check_local_files

    check_local_files(cfg)


def _check_data(cfg: config_mod.Config) -> None:
    """Record-level problems are reported before any worker starts (local sources)."""
    from distft.data import check_records

    check_records(cfg)


@app.command()
def validate(config: Path = CONFIG_ARG, overrides: list[str] | None = OVERRIDES_ARG) -> None:
    """Check a config (and that its files exist and parse) without training."""
    cfg = _load(config, overrides, train=False)
    _check_output_dir(cfg)
    _check_resume(cfg)
    out.print(
        f"ok: {config} ({cfg.cluster.num_workers} workers, ZeRO-{cfg.deepspeed.zero_stage}, "
        f"{'LoRA' if cfg.lora.enabled else 'full'}, {cfg.deepspeed.precision.value})"
    )


VERBOSE_OPT = typer.Option(
    False, "--verbose", "-v", help="Show every worker's and library's output live."
)


@app.command()
def train(
    config: Path = CONFIG_ARG,
    overrides: list[str] | None = OVERRIDES_ARG,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Fine-tune: typed config -> Ray workers -> DeepSpeed -> checkpoints + final model."""
    from distft import console as console_mod

    with console_mod.session(verbose) as con:  # library logs: to the log file, from here
        cfg = _resolve_auto_batch(_load(config, overrides, train=True))
        _check_output_dir(cfg)  # every check before config.yaml is written: a refusal
        _check_resume(cfg)  # changes nothing
        if done := rundir.finished(cfg):
            out.print(done, markup=False)  # and nothing is written
            return
        _refuse_user_error(rundir.claim, cfg.output_dir)
        _print_plan_summary(cfg)
        config_mod.save_resolved(cfg, cfg.output_dir / "config.yaml")
        con.open_log(cfg.output_dir)
        _reshard_before_launch(cfg)
        failed, preempted, wall = _run(cfg, con)
    if failed is not None:
        for line in failed.trace.splitlines():
            err.print(line, markup=False)
        _fail([str(failed)], EXIT_BAD_INPUT if failed.user_error else EXIT_FAILED)
    if preempted:
        err.print("preempted: checkpoint committed; rerun the same command to resume")
        raise typer.Exit(preempt.EXIT_PREEMPTED)
    from distft.console_lines import summary
    from distft.report import write_report

    report_path = write_report(cfg.output_dir)
    for line in summary(cfg.output_dir, wall, report_path, con.log_path):
        out.print(line, markup=False)


def _resolve_auto_batch(cfg: config_mod.Config) -> config_mod.Config:
    """`batch.micro_batch_size: auto` -> the planner's number, said in one line; config.yaml
    and the workers see the number."""
    from distft.plan.auto import resolve_auto

    try:
        resolved, line = _plan_of(cfg, resolve_auto)
    except UserError as e:
        _fail(str(e).splitlines(), EXIT_BAD_INPUT)
    if line:
        err.print(line, markup=False)
    return resolved


def _print_plan_summary(cfg: config_mod.Config) -> None:
    """The planner's one line (`plan: 35.21 GiB per rank (...)`); a model the planner
    cannot read (no local config.json) is said, never a reason not to train."""
    from distft.plan import make_plan
    from distft.plan.report import summary

    try:
        err.print(summary(make_plan(cfg)), markup=False)
    except (UserError, OSError, ValueError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        err.print(f"plan: not available ({why})", markup=False)


def _reshard_before_launch(cfg: config_mod.Config) -> None:
    from distft.checkpoint.reshard import convert_for_resume

    if line := convert_for_resume(cfg):  # before Ray: no collective timeout bounds it
        err.print(line, markup=False)


def _run(cfg: config_mod.Config, con: RunConsole) -> tuple[TrainingFailed | None, bool, float]:
    """Ray, the workers, the restarts: (the failure or None, preempted, seconds)."""
    from distft.launch.ray import TrainingFailed, init_ray, launch

    t0 = time.perf_counter()
    preempt.clear(cfg.output_dir)
    _refuse_user_error(lambda c: init_ray(c, quiet=not con.verbose), cfg)  # before our
    # signal handlers (ray.init installs its own SIGTERM handler); no Ray at
    # cluster.address: one line, exit 2
    con.take_worker_output()
    failed = None
    with preempt.on_signal(cfg.output_dir) as signals:
        try:
            launch(cfg, log=con.warn)
        except TrainingFailed as e:
            failed = e
    if signals and failed is None:
        preempt.clear(cfg.output_dir)
    return failed, bool(signals) and failed is None, time.perf_counter() - t0


@app.command()
def plan(
    config: Path = CONFIG_ARG,
    overrides: list[str] | None = OVERRIDES_ARG,
    gpu_memory: str | None = typer.Option(None, "--gpu-memory", help="Per GPU, e.g. 80GiB."),
    host_memory: str | None = typer.Option(None, "--host-memory", help="Per rank, e.g. 200GiB."),
    as_json: bool = typer.Option(False, "--json", help="The same figures as JSON."),
) -> None:
    """Memory per rank (model states, activations, DeepSpeed buffers, host RAM) from the
    config and the model's config.json; whether it fits and the cheapest change that does."""
    import json
    import logging

    # DeepSpeed logs "Setting accelerator to CPU" to stdout as it loads: not into the JSON
    logging.getLogger("DeepSpeed").addFilter(lambda r: r.levelno >= logging.ERROR)
    from distft.export.hf_folder import parse_size
    from distft.plan import make_plan
    from distft.plan import report as plan_report
    from distft.plan.auto import resolve_auto

    try:
        cfg = config_mod.resolve_paths(config_mod.load(config, overrides or []))
        gpu = None if gpu_memory is None else parse_size(gpu_memory, "--gpu-memory")
        host = None if host_memory is None else parse_size(host_memory, "--host-memory")
        cfg, auto_line = _plan_of(cfg, lambda c: resolve_auto(c, gpu))
        result = _plan_of(cfg, make_plan)
    except UserError as e:
        _fail(str(e).splitlines(), EXIT_BAD_INPUT)
    if as_json:
        out.print(json.dumps(plan_report.as_json(result, gpu, host), indent=2), markup=False)
        return
    if auto_line:
        out.print(auto_line, markup=False)
    for line in plan_report.table(result, gpu, host):
        out.print(line, markup=False)


def _plan_of(cfg: config_mod.Config, make: Callable[[config_mod.Config], T]) -> T:
    """The plan, or one line when the model's config.json is not here (the planner reads
    a local folder or the hub cache; it downloads nothing)."""
    try:
        return make(cfg)
    except (OSError, ValueError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"model.name_or_path: cannot read the config of {cfg.model.name_or_path} here "
            f"({why}); the planner needs a local folder or a cached hub model"
        ) from None


@app.command()
def preprocess(config: Path = CONFIG_ARG, overrides: list[str] | None = OVERRIDES_ARG) -> None:
    """Tokenize the data into the preprocessing cache ahead of training (no Ray, no GPU)."""
    from distft.data.preprocess import preprocess as build_cache

    try:
        cfg = config_mod.resolve_paths(config_mod.load(config, overrides or []))
        build_cache(cfg, lambda line: out.print(line, markup=False))
    except UserError as e:
        _fail(str(e).splitlines(), EXIT_BAD_INPUT)


@app.command()
def export(
    source: Path = typer.Argument(
        ..., help="Run directory (uses checkpoints/latest) or a checkpoints/step_* directory."
    ),
    out_dir: Path = typer.Option(..., "--out", help="Output directory (new or empty)."),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="LoRA: write W + BA merged."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the run's precision), fp32, bf16."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check logits (default on)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Per safetensors file."),
) -> None:
    """Checkpoint -> Hugging Face model or PEFT adapter, checked against the checkpoint."""
    from distft.export import export_checkpoint
    from distft.export.verify import VerificationFailed

    try:
        result = export_checkpoint(
            source,
            out_dir,
            merge_lora=merge_lora,
            dtype=dtype,
            verify=verify,
            max_shard_size=max_shard_size,
            log=lambda line: err.print(line, markup=False),
        )
    except UserError as e:
        _fail(str(e).splitlines(), EXIT_BAD_INPUT)
    except VerificationFailed as e:
        _fail([f"verification failed: {e}"], EXIT_FAILED)
    out.print(result.line(), markup=False)


@app.command()
def reshard(
    source: Path = typer.Argument(
        ..., help="Run directory (its newest valid checkpoint) or a checkpoints/step_* directory."
    ),
) -> None:
    """Convert a checkpoint to DeepSpeed's universal form (one process per core), so a
    resume on another number of workers starts at once."""
    from distft.checkpoint.reshard import convert_before_launch

    if not source.is_dir():
        _fail([f"{source}: not a directory"], EXIT_BAD_INPUT)
    try:
        line = convert_before_launch(source, None)
    except UserError as e:
        _fail(str(e).splitlines(), EXIT_BAD_INPUT)
    assert line is not None  # strict: a line, or an error
    out.print(line, markup=False)


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="One or more runs' output directories."),
    out_dir: Path | None = typer.Option(
        None, "--out", help="Page folder for several runs (default ./distft-report)."
    ),
) -> None:
    """Plots of a run's metrics and one HTML page (RUN_DIR/report.html); several runs:
    overlaid on one page in --out."""
    from distft.report import write_report
    from distft.report_compare import DEFAULT_OUT, write_comparison

    try:
        if len(run_dirs) == 1 and out_dir is None:
            page = write_report(run_dirs[0])
        else:
            page = write_comparison(run_dirs, out_dir or DEFAULT_OUT)
        out.print(f"report: {page}", markup=False)
    except UserError as e:
        _fail(str(e).splitlines(), EXIT_BAD_INPUT)


@app.command()
def chat(
    source: Path = typer.Argument(
        ..., help="A run directory (its final/ model or adapter), a model or an adapter folder."
    ),
    prompt: str | None = typer.Option(None, "--prompt", help="Answer this one turn and exit."),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Per answer."),
    temperature: float | None = typer.Option(
        None, "--temperature", min=0.0, help="0: greedy (default with --prompt); else 0.7."
    ),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling, in (0, 1]."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for sampling."),
) -> None:
    """Chat with a trained model: interactive on a terminal, else one turn per stdin line."""
    from distft import chat as chat_mod

    if temperature is None:
        temperature = 0.0 if prompt is not None else 0.7
    if not 0 < top_p <= 1:
        _fail([f"--top-p: expected a value in (0, 1] (got {top_p})"], EXIT_BAD_INPUT)
    sampling = chat_mod.Sampling(max_new_tokens, temperature, top_p, seed)
    try:
        found = chat_mod.find_model(source)
        model, tokenizer = chat_mod.load(found, chat_mod.default_device())
        conversation = chat_mod.Chat(model, tokenizer, sampling, system)
        if prompt is not None:
            conversation.say(prompt)
        else:
            interactive = sys.stdin.isatty()
            chat_mod.converse(conversation, chat_mod.user_turns(interactive), interactive)
    except UserError as e:
        _fail(str(e).splitlines(), EXIT_BAD_INPUT)


@app.command("make-tiny")
def make_tiny(
    root: Path = typer.Argument(..., help="Directory for the tiny model, tokenizer and data."),
) -> None:
    """Build the offline tiny Llama, tokenizer and synthetic dataset (demo and tests)."""
    import logging
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Writing model shards"
    # transformers imports DeepSpeed, which logs "Setting accelerator to CPU" as it loads
    logging.getLogger("DeepSpeed").addFilter(lambda r: r.levelno >= logging.ERROR)
    from distft.assets import build_tiny_assets

    assets = build_tiny_assets(root)
    out.print(f"tiny assets ready: model {assets.model_dir}, data {assets.train_file.parent}")


def main() -> None:  # pragma: no cover - console script wrapper
    app(prog_name="distft")
    sys.exit(0)
