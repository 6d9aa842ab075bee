"""The console of `distft train`: distft's own lines on the terminal, everything else in
the run's log file.

Who writes what:

- Workers write distft's lines to their stdout/stderr with the `[distft] ` prefix (rank 0
  only, `DistContext.log`); libraries (Ray Train, DeepSpeed, transformers, torch warnings)
  write there too. Ray streams every worker's lines to the driver, where its printer
  (`ray_print_logs`, enabled by `log_to_driver`) prefixes them with `(RayTrainWorker
  pid=...)`. By default `RunConsole.take_worker_output` replaces that printer with ours:
  every line goes to `<output_dir>/logs/train.log`, and distft's lines (prefix stripped)
  to the console; a progress line is redrawn in place when stdout is a terminal.
- The driver's library logs (Ray's `ray` logger, DeepSpeed's `DeepSpeed` logger,
  transformers', Python warnings) are routed through the root logger to the same file;
  an error among them is also shown on the console, once.
- `--verbose`: Ray's printer and the libraries' own handlers stay (the console shows
  everything live, as Ray prints it); the workers' lines still go to the log file too.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

LOG_FILE = Path("logs") / "train.log"
PREFIX = "[distft] "  # distft's own lines from the workers (distft.dist.DistContext.log)
PROGRESS = re.compile(r"step +\d+/\d+ ")  # a progress line (distft.console_lines.progress_line)
_RAY_PRINTER = "ray_print_logs"  # the handler name in ray._private.worker.connect
_OURS = "distft_console"
# Loggers that libraries give their own console handler (and no propagation): in quiet
# mode their records go to the root logger's handlers instead (the log file).
_LIBRARY_LOGGERS = ("ray", "DeepSpeed", "transformers", "torch", "py.warnings")
_LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CLEAR = "\r\x1b[K"  # carriage return + erase the line (ANSI)


class Display:
    """distft's lines on the terminal. On a TTY the newest progress line is redrawn in
    place below the other lines; elsewhere (Slurm, CI logs, pipes) every line is printed
    as a plain line. Thread-safe: Ray's log thread and the main thread both write."""

    def __init__(self, out: TextIO, err: TextIO, tty: bool | None = None):
        self.out, self.err = out, err
        self.tty = out.isatty() if tty is None else tty
        self._progress = ""  # the line now drawn at the bottom (TTY only)
        self._shown: set[str] = set()
        self._lock = threading.Lock()

    def line(self, text: str, err: bool = False) -> None:
        with self._lock:
            self._lift()
            stream = self.err if err else self.out
            stream.write(text + "\n")
            stream.flush()
            self._drop()

    def once(self, text: str) -> None:
        """An error line on stderr, the first time it comes."""
        if text not in self._shown:
            self._shown.add(text)
            self.line(text, err=True)

    def progress(self, text: str) -> None:
        if not self.tty:
            self.line(text)
            return
        with self._lock:
            self._progress = text
            self.out.write(_CLEAR + text)
            self.out.flush()

    def close(self) -> None:
        """End the redrawn line: what follows starts on a line of its own."""
        with self._lock:
            if self._progress:
                self.out.write("\n")
                self.out.flush()
                self._progress = ""

    def _lift(self) -> None:  # clear the progress line before another line is printed
        if self._progress:
            self.out.write(_CLEAR)
            self.out.flush()

    def _drop(self) -> None:  # and draw it again below that line
        if self._progress:
            self.out.write(self._progress)
            self.out.flush()


class _ConsoleErrors(logging.Handler):
    """Library errors from the driver's loggers: one line on the console, once each
    (`ray error: ...`: never `error: ...`, distft's own refusals)."""

    def __init__(self, display: Display):
        super().__init__(logging.ERROR)
        self.display = display

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().splitlines()[0] if record.getMessage() else ""
        library = record.name.split(".")[0]
        self.display.once(f"{library} {record.levelname.lower()}: {message}")


class RunConsole:
    """The console of one `distft train` process; `session()` makes one."""

    def __init__(self, display: Display, verbose: bool):
        self.display, self.verbose = display, verbose
        self.log_path: Path | None = None
        self._file: TextIO | None = None
        self._lock = threading.Lock()
        # library records before the run directory is known (config checks)
        self._early = logging.handlers.MemoryHandler(10**6, flushLevel=logging.CRITICAL + 1)
        self._file_handler: logging.Handler | None = None

    # ------------------------------------------------------------------ driver logs
    def route_library_logs(self) -> None:
        """Library loggers -> the root logger -> the log file (+ errors once on the
        console). Verbose: the libraries keep their own handlers; the file gets a copy of
        what reaches the root logger."""
        root = logging.getLogger()
        root.addHandler(self._early)
        if self.verbose:
            return
        root.setLevel(logging.INFO)
        root.addHandler(_ConsoleErrors(self.display))
        logging.captureWarnings(True)  # warnings.warn -> the `py.warnings` logger
        self._adopt_library_loggers()

    def _adopt_library_loggers(self) -> None:
        if not self.verbose:
            for name in _LIBRARY_LOGGERS:
                adopt(logging.getLogger(name))

    def open_log(self, output_dir: Path) -> Path:
        """Start writing `<output_dir>/logs/train.log` (appended: a resumed or restarted
        run keeps the earlier attempts' lines), with what was logged so far."""
        path = Path(output_dir) / LOG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8", buffering=1)
        self._file.write(f"==== distft train, {time.strftime('%Y-%m-%d %H:%M:%S %Z')} ====\n")
        handler = logging.StreamHandler(self._file)
        handler.setFormatter(logging.Formatter(_LINE_FORMAT))
        self._early.setTarget(handler)
        self._early.flush()
        root = logging.getLogger()
        root.removeHandler(self._early)
        root.addHandler(handler)
        self._file_handler, self.log_path = handler, path
        import ray  # noqa: F401  (Ray gives its logger a handler of its own on import)

        self._adopt_library_loggers()
        return path

    def write_log(self, line: str) -> None:
        if self._file is not None:
            with self._lock:
                self._file.write(line + "\n")

    # --------------------------------------------------------------- worker output
    def take_worker_output(self) -> None:
        """After `ray.init`: every worker's lines to the log file; distft's lines to the
        console, in place of Ray's printer (kept with --verbose)."""
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as streams

        if not self.verbose:
            streams.remove_handler(_RAY_PRINTER)
        self._adopt_library_loggers()  # transformers' and DeepSpeed's, imported since
        streams.remove_handler(_OURS)
        streams.add_handler(_OURS, self.on_worker_output)

    def on_worker_output(self, data: dict[str, Any]) -> None:
        """One batch of a worker's lines, as Ray's log monitor publishes it."""
        lines = data.get("lines", [])
        if data.get("pid") == "autoscaler":  # its status dumps: only events, as Ray prints
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
        who = data.get("actor_name") or data.get("task_name") or "worker"
        where = f"({who} pid={data.get('pid')}, ip={data.get('ip')})"
        is_err = bool(data.get("is_err"))
        for line in lines:
            self.write_log(f"{where} {line}")
            if self.verbose or not line.startswith(PREFIX):
                continue
            text = line[len(PREFIX) :]
            if not is_err and PROGRESS.match(text):
                self.display.progress(text)
            else:
                self.display.line(text, err=is_err)

    def warn(self, line: str) -> None:
        """A driver warning (restarts, waiting for room): console and log."""
        self.write_log(f"warning: {line}")
        self.display.line(f"warning: {line}", err=True)

    def close(self) -> None:
        """End the progress display. The routing stays for the rest of the process: what
        Ray and the libraries log while they shut down goes to the log file as well."""
        self.display.close()


def adopt(logger: logging.Logger) -> None:
    """Send a library logger's records to the root logger's handlers: its own handlers
    go, propagation comes back (Ray's `clear_logger` does the same). DeepSpeed adds its
    stdout handler when it is imported, and logs at once (`Setting accelerator to CPU`):
    a filter on the logger itself, which an import does not remove, hands those records
    to the root logger too."""
    logger.handlers.clear()
    logger.propagate = True
    if not any(isinstance(f, _ToRoot) for f in logger.filters):
        logger.addFilter(_ToRoot(logger))


class _ToRoot(logging.Filter):
    """Records logged on this very logger while it still has handlers of its own (added
    again by a library after `adopt`) go to the root's handlers instead."""

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.logger = logger

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.logger.handlers:
            return True  # propagates as usual
        logging.getLogger().handle(record)
        return False


@contextlib.contextmanager
def session(
    verbose: bool, out: TextIO | None = None, err: TextIO | None = None
) -> Iterator[RunConsole]:
    """The console of one `distft train`: library logs routed from the start (config
    checks import DeepSpeed), the log file from `open_log` on."""
    console = RunConsole(Display(out or sys.stdout, err or sys.stderr), verbose)
    console.route_library_logs()
    try:
        yield console
    finally:
        console.close()
