"""A progress bar per stage (rich), showing a few headline metrics."""

from __future__ import annotations

from types import TracebackType

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

HEADLINE = ("loss", "rewards/accuracies", "eval/rewards/accuracies", "eval/ranking_accuracy")


class StageProgress:
    """Context manager; ``update(step, total, metrics)`` advances the bar."""

    def __init__(self, stage: str, *, disabled: bool = False) -> None:
        self.stage = stage
        self.disabled = disabled
        self._progress: Progress | None = None
        self._task = None
        self._shown: dict[str, float] = {}

    def __enter__(self) -> StageProgress:
        if not self.disabled:
            self._progress = Progress(
                TextColumn(f"[bold]{self.stage}[/bold]"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            )
            self._progress.start()
        return self

    def update(self, step: int, total: int, metrics: dict[str, float]) -> None:
        if self._progress is None:
            return
        if self._task is None:
            self._task = self._progress.add_task(self.stage, total=total, info="")
        for key in HEADLINE:
            if key in metrics:
                self._shown[key] = metrics[key]
        info = "  ".join(f"{k}={v:.3f}" for k, v in self._shown.items())
        self._progress.update(self._task, completed=step, info=info)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
