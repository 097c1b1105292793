"""One progress line per stage (rich): the stage's full name, its bar, and the few metrics that
matter (the first ``SHOWN`` of its kind's headline metrics that it logs); the metrics are what gets
cut when the terminal is narrow, never the name."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column

SHOWN = 4


class StageProgress:
    """Context manager; ``update(step, total, metrics)`` advances the bar."""

    def __init__(self, stage: str, headline: Mapping[str, str] | None = None, *, disabled: bool = False,
                 console: Console | None = None) -> None:
        """``headline``: metric → its short label on the line, in the order of preference."""
        self.stage = stage
        self.headline = dict(headline or {})
        self.disabled = disabled
        self.console = console
        self._progress: Progress | None = None
        self._task = None
        self._shown: dict[str, float] = {}

    def __enter__(self) -> StageProgress:
        if not self.disabled:
            self._progress = Progress(
                TextColumn(f"[bold]{self.stage}[/bold]", table_column=Column(no_wrap=True, min_width=len(self.stage))),
                BarColumn(bar_width=12), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                console=self.console, expand=True,
            )
            self._progress.start()
        return self

    def update(self, step: int, total: int, metrics: dict[str, float]) -> None:
        if self._progress is None:
            return
        if self._task is None:
            self._task = self._progress.add_task(self.stage, total=total, info="")
        for key in self.headline:
            if key in metrics:
                self._shown[key] = metrics[key]
        shown = [k for k in self.headline if k in self._shown][:SHOWN]
        info = "  ".join(f"{self.headline[k]}={self._shown[k]:.3f}" for k in shown)
        self._progress.update(self._task, completed=step, info=info)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
