"""What a stage records: its metrics (each step exactly once in MLflow), its tables and artifacts,
its progress line, and the spans of its phases."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.runtime import faults
from orchestrator.runtime.recovery import Supervisor
from orchestrator.runtime.tracking import Tracker

History = dict[str, list[tuple[int, float]]]


class StageLog:
    """A stage's metrics, tables, artifacts, progress and phase spans.

    With in-stage checkpoints (``buffered``) metrics and MLflow writes are held until the next
    checkpoint (or the stage's end) is written: a resumed stage replays the steps after its last
    checkpoint, and their metrics must not reach MLflow twice. The supervisor's fault events since the
    last step join each step's metrics (``faults/restarts/<role>``, ``faults/recovery_s``, a tag each).
    """

    def __init__(self, tracker: Tracker | None, *, buffered: bool = False, supervisor: Supervisor | None = None,
                 progress: Callable[[int, int, dict[str, float]], None] | None = None) -> None:
        self.tracker = tracker
        self.buffered = buffered
        self.supervisor = supervisor or Supervisor()
        self.history: History = {}
        self._progress = progress
        self._held: list[tuple[dict[str, float], int]] = []
        self._deferred: list[Callable[[], None]] = []
        self._spans: list[tuple[str, float, float]] = []  # (phase, start, end), perf_counter

    # ------------------------------------------------------------ metrics and MLflow writes

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record a step's metrics (held back while ``buffered``), with the fault events since the last."""
        fault_metrics, tags = self.supervisor.unreported()
        if fault_metrics:
            metrics = dict(metrics) | fault_metrics
            self._tracker().set_tags(tags)
        if self.buffered:
            self._held.append((dict(metrics), step))
        else:
            self._tracker().log_metrics(metrics, step)
        for name, value in metrics.items():
            self.history.setdefault(name, []).append((step, float(value)))

    def defer(self, write: Callable[[], None]) -> None:
        """Run an MLflow write with the step's metrics: at the next checkpoint when they are held back
        (a replayed step must not append a table twice), else now."""
        if self.buffered:
            self._deferred.append(write)
        else:
            write()

    def table(self, table: dict[str, list[Any]], artifact_file: str) -> None:
        """An MLflow table (``mlflow.log_table``) of this step, written with its metrics."""
        self.defer(lambda: self._tracker().log_table(table, artifact_file=artifact_file))

    def params(self, params: dict[str, Any]) -> None:
        """Facts of the stage's run that have one value (the data's row counts): MLflow params, now
        (a resumed stage logs the same values again, which MLflow accepts)."""
        self._tracker().log_params(params)

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file of this step as an artifact of the stage's run, written with its metrics."""
        self.defer(lambda: self._tracker().log_artifact(path, artifact_path=artifact_path))

    def commit(self) -> None:
        """Send what was held back since the last checkpoint to MLflow."""
        for metrics, step in self._held:
            self._tracker().log_metrics(metrics, step)
        for write in self._deferred:
            write()
        self._held.clear()
        self._deferred.clear()
        if self.tracker is not None:
            self.tracker.flush()

    def held(self) -> list[tuple[dict[str, float], int]]:
        """The metrics held back since the last checkpoint (a new checkpoint keeps them)."""
        return list(self._held)

    def rewind(self, done: int) -> None:
        """After a rollback to step ``done``: forget what was held or recorded for the steps after it
        (they run again; their tables and artifacts come again with them)."""
        self._held = [(m, step) for m, step in self._held if step <= done]
        self._deferred.clear()
        self.history = {name: [(s, v) for s, v in points if s <= done] for name, points in self.history.items()}

    def replay_missing(self, entries: list[list[Any]]) -> None:
        """A restored checkpoint's held metrics that did not reach MLflow before a crash are logged
        now; the stage's history becomes what its run holds."""
        tracker = self._tracker()
        history = tracker.metric_history(tracker.active_run_id) if tracker.active_run_id else {}
        logged = {name: {step for step, _ in points} for name, points in history.items()}
        for metrics, step in entries:
            missing = {k: v for k, v in metrics.items() if step not in logged.get(k, ())}
            if missing:
                tracker.log_metrics(missing, step)
        tracker.flush()
        self.history = tracker.metric_history(tracker.active_run_id)

    def _tracker(self) -> Tracker:
        if self.tracker is None:
            raise RuntimeError("this stage log has no tracker")
        return self.tracker

    # ------------------------------------------------------------ progress and phases

    def progress(self, step: int, total: int, metrics: dict[str, float]) -> None:
        if self._progress is not None:
            self._progress(step, total, metrics)

    @contextmanager
    def timed(self, phase: str, sink: dict[str, float]) -> Iterator[None]:
        """Time a named phase into ``sink["timing/<phase>_s"]`` and its span; calls inside name the phase."""
        start = time.perf_counter()
        with faults.at(phase=phase):
            yield
        self.span(phase, start, time.perf_counter(), sink)

    def span(self, phase: str, start: float, end: float, sink: dict[str, float]) -> None:
        """Record that ``phase`` ran from ``start`` to ``end`` (perf_counter; phases may overlap)."""
        self._spans.append((phase, start, end))
        sink[f"timing/{phase}_s"] = end - start

    def spans(self) -> list[tuple[str, float, float]]:
        """The spans recorded since the last ``take_spans``."""
        return list(self._spans)

    def take_spans(self, origin: float) -> dict[str, list[float]]:
        """The phases recorded since the last call as {phase: [start_s, end_s]} from ``origin`` (an
        iteration's start), and forgets them."""
        spans = {phase: [round(start - origin, 4), round(end - origin, 4)] for phase, start, end in self._spans}
        self._spans.clear()
        return spans
