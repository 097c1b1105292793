"""What a run shows on the console: the plan, one progress line per stage and the summary. The rest
(the actors' output as Ray forwards it: vLLM, DeepSpeed, transformers, Ray's own lines; and the
driver's third-party loggers and warnings) goes to the current stage's log file in the run
directory (``stages/<name>/stage.log``; ``pipeline.log`` between stages), and to the console too
with ``verbose``. A failed stage prints what failed, where its log is, and the log's last lines.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from orchestrator.runtime.tracking import restore_env

# Python loggers of the libraries a driver imports; their records go to the log file.
THIRD_PARTY_LOGGERS = ("vllm", "deepspeed", "DeepSpeed", "transformers", "torch", "ray", "mlflow", "urllib3",
                       "filelock", "py.warnings")
# Of those, the ones that print through a console handler of their own. Ray's (installed at its
# import, which comes first) is taken off while the console is attached, unless verbose. DeepSpeed
# installs its handler when it is imported, often after attach(), and logs on that logger itself: a
# filter on the logger sends its records to the log file before any handler of its own sees them.
OWN_CONSOLE_HANDLERS = ("ray",)
DIVERTED_LOGGERS = ("DeepSpeed",)
# transformers' and huggingface_hub's progress bars (a driver saving the task's tiny model prints
# "Writing model shards"): read once at their import, which comes after attach().
PROGRESS_BARS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"
# The product's own loggers (``rlhf.faults``: one line per recovery): their records go to the log file
# and, one line each, to the console.
OWN_LOGGERS = ("rlhf",)
RAY_PRINT_HANDLER = "ray_print_logs"  # the name Ray gives its console printer of worker output
OUR_HANDLER = "rlhf_stage_logs"
TAIL_LINES = 20
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Worker lines reach the driver through Ray's log monitor a moment after they are written: how long
# a failed stage waits for the last of them before printing its log's tail.
LOG_SETTLE_S = 1.0


def _dispatcher() -> Any:
    """Ray's dispatcher of worker stdout/stderr lines in the driver (a private module: Ray offers no
    public hook to route them). None where this Ray lacks it: worker output then stays on the console."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except ImportError:  # pragma: no cover (the pinned Ray has it; tests/sanity checks)
        return None
    return global_worker_stdstream_dispatcher if hasattr(global_worker_stdstream_dispatcher, "handlers") else None


def error_message(exc: BaseException) -> str:
    """An exception's message for the console: a Ray task error's cause (the exception the actor
    raised), without Ray's framing and colours."""
    cause = getattr(exc, "cause", None)
    return ANSI.sub("", str(cause if isinstance(cause, BaseException) else exc)).strip()


def _autoscaler_events(lines: list[str]) -> list[str]:
    """The autoscaler's events (a node added, a request no node can fit) among the monitor's raw log
    lines, which Ray forwards whole; Ray's own printer keeps only these, and so do we."""
    try:
        from ray._private.worker import filter_autoscaler_events

        return list(filter_autoscaler_events(lines))
    except Exception:  # noqa: BLE001 (a Ray without it, or no GCS to ask its version: no events, no crash)
        return []


def _prints_to_console(handler: logging.Handler) -> bool:
    """A library's own stream handler (Ray's ``PlainRayHandler``, DeepSpeed's), not a file it writes."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def format_worker_lines(data: dict[str, Any]) -> list[str]:
    """Ray's worker-output record as log lines, prefixed like Ray's console: ``(Actor pid=N[, ip=X])``.
    Of the autoscaler's record (``pid`` "autoscaler": the monitor's whole log) only its events."""
    who = data.get("actor_name") or data.get("task_name") or ""
    pid = data.get("pid", "?")
    if pid == "autoscaler":
        return [f"(autoscaler) {line}" for line in _autoscaler_events(data.get("lines", []))]
    ip = data.get("ip")
    where = f", ip={ip}" if ip and ip != data.get("localhost") else ""
    prefix = f"({who + ' ' if who else ''}pid={pid}{where})"
    stream = "err" if data.get("is_err") else "out"
    return [f"{prefix} [{stream}] {line}" for line in data.get("lines", [])]


class RunConsole:
    """Routes third-party output to a log file: ``attach()`` before Ray starts (its start-up lines and
    the driver's loggers), ``attach_workers()`` once it runs (the actors' output), ``detach()`` at the
    end. ``attach()`` on a running Ray does both."""

    def __init__(self, pipeline_log: Path, *, verbose: bool = False) -> None:
        self.verbose = verbose
        self._lock = threading.Lock()
        self._default = pipeline_log
        self._path = pipeline_log
        self._file: TextIO | None = None
        self._saved_ray: list[tuple[str, Callable]] = []
        self._handler = logging.StreamHandler(self)  # type: ignore[arg-type]  (self.write / self.flush)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._saved_loggers: dict[str, tuple[bool, int]] = {}
        self._saved_handlers: dict[str, list[logging.Handler]] = {}
        self._saved_env: str | None = None
        self._shown = logging.StreamHandler(sys.stderr)  # the product's own lines, on the console
        self._shown.setFormatter(logging.Formatter("%(message)s"))
        self._attached = False

    @property
    def log_path(self) -> Path:
        return self._path

    def _divert(self, record: logging.LogRecord) -> bool:
        """A logger filter (it sees only records the logger's level let through): the record to the
        log file, and to none of the logger's own handlers."""
        self._handler.handle(record)
        return False

    def attach(self) -> None:
        self._open(self._default)
        for name in THIRD_PARTY_LOGGERS:
            logger = logging.getLogger(name)
            self._saved_loggers[name] = (logger.propagate, logger.level)
            if name in OWN_CONSOLE_HANDLERS and not self.verbose:
                self._saved_handlers[name] = [h for h in logger.handlers if _prints_to_console(h)]
                for handler in self._saved_handlers[name]:
                    logger.removeHandler(handler)
            if name in DIVERTED_LOGGERS and not self.verbose:
                logger.addFilter(self._divert)
            logger.addHandler(self._handler)
            logger.propagate = self.verbose
        for name in OWN_LOGGERS:
            logger = logging.getLogger(name)
            self._saved_loggers[name] = (logger.propagate, logger.level)
            logger.addHandler(self._handler)
            logger.addHandler(self._shown)
            logger.propagate = False
            logger.setLevel(logging.INFO)  # their info lines (the data's length counts) are shown too
        logging.captureWarnings(True)
        if not self.verbose:
            self._saved_env = os.environ.get(PROGRESS_BARS_ENV)
            os.environ[PROGRESS_BARS_ENV] = "1"
        self._attached = True
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            self.attach_workers()

    def attach_workers(self) -> None:
        """The actors' output (Ray's dispatcher of worker lines in the driver) to the log: once Ray runs."""
        dispatcher = _dispatcher()
        if dispatcher is not None:
            with dispatcher._lock:
                if not self.verbose:  # kept across calls: a second call finds the printer already off
                    self._saved_ray += [pair for pair in dispatcher.handlers
                                        if pair[0] == RAY_PRINT_HANDLER and pair not in self._saved_ray]
                dispatcher.handlers = [pair for pair in dispatcher.handlers
                                       if pair[0] != OUR_HANDLER and pair not in self._saved_ray]
                dispatcher.handlers.append((OUR_HANDLER, self._on_worker_output))

    def detach(self) -> None:
        if not self._attached:
            return
        self._attached = False
        dispatcher = _dispatcher()
        if dispatcher is not None:
            import ray

            with dispatcher._lock:
                dispatcher.handlers = [pair for pair in dispatcher.handlers if pair[0] != OUR_HANDLER]
                if ray.is_initialized():  # a Ray that outlives the run (tests, notebooks) prints again
                    dispatcher.handlers.extend(p for p in self._saved_ray if p not in dispatcher.handlers)
            self._saved_ray = []
        for name, (propagate, level) in self._saved_loggers.items():
            logger = logging.getLogger(name)
            logger.removeHandler(self._handler)
            logger.removeHandler(self._shown)
            logger.propagate, logger.level = propagate, level
            for handler in self._saved_handlers.pop(name, []):
                logger.addHandler(handler)
            logger.removeFilter(self._divert)
        logging.captureWarnings(False)
        if not self.verbose:
            restore_env(PROGRESS_BARS_ENV, self._saved_env)
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    @contextmanager
    def stage(self, log_path: Path) -> Iterator[Path]:
        """Route to ``log_path`` (appended: a resumed stage keeps its earlier lines) while the body runs."""
        self._open(log_path)
        try:
            yield log_path
        finally:
            self._open(self._default)

    def stage_failed(self, stage: str, log_path: Path, exc: BaseException) -> None:
        """Print what failed, where the stage's log is and its last lines; then add the traceback to it."""
        time.sleep(LOG_SETTLE_S)
        self.flush()
        # The tail is what ran up to the failure (the actors' last lines), read before the traceback is added.
        lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
        self.write("".join(traceback.format_exception(exc)))
        self.flush()
        summary = (error_message(exc).splitlines() or [""])[0]
        tail = "\n".join(f"    {line}" for line in lines[-TAIL_LINES:])
        print(f"\nstage {stage!r} failed: {type(exc).__name__}: {summary}\n"
              f"  its log (actors' output, the traceback): {log_path}\n  last lines:\n{tail}", file=sys.stderr)
        try:
            exc.rlhf_reported = True  # type: ignore[attr-defined]  (the CLI prints no second copy)
        except AttributeError:  # pragma: no cover (exceptions with __slots__)
            pass

    def stage_stopped(self, stage: str, log_path: Path) -> None:
        """A stage stopped by bad input found while it ran (a reward function that raises, a row that
        does not fit): the message names the cause; this names the stage and its log."""
        print(f"stage {stage!r} stopped; its log: {log_path}", file=sys.stderr)

    def note(self, line: str, *, quiet: bool = False) -> None:
        """A line the driver reports (e.g. a registry alias moved or refused): into the current log file
        (the pipeline's, or the stage's while one runs), and on the console unless ``quiet``."""
        self.write(line + "\n")
        self.flush()
        if not quiet:
            print(line)

    # A file-like sink for the logging handler.
    def write(self, text: str) -> int:
        with self._lock:
            if self._file is not None:
                self._file.write(text)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def _on_worker_output(self, data: dict[str, Any]) -> None:
        lines = format_worker_lines(data)
        if lines:
            self.write("\n".join(lines) + "\n")
            self.flush()

    def _open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._file is not None:
                self._file.close()
            self._file = path.open("a", encoding="utf-8")
            self._path = path
