"""What a stage sees of the driver: its inputs, its directory, actor groups, metrics and progress."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.actor_group import ActorGroup, StagePlacement
from orchestrator.plan import plan_stage
from orchestrator.resources import WorkerResources
from orchestrator.stage_config import StageRef
from orchestrator.tracking import Tracker


@dataclass
class StageContext:
    """Handed to a stage's ``run(config, ctx)``; the stage returns its outputs (name → path)."""

    stage: Any
    stage_dir: Path
    upstream_outputs: dict[str, dict[str, str]]
    tracker: Tracker
    seed: int = 0
    progress: Callable[[int, int, dict[str, float]], None] | None = None
    groups: list[ActorGroup] = field(default_factory=list)
    metrics_history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    placement: StagePlacement | None = None

    def input(self, field_path: str) -> str | None:
        """Resolve an input field (e.g. ``data.train``) to a path: a literal or an upstream output."""
        value = self.stage.field(field_path)
        if value is None or isinstance(value, str):
            return value
        assert isinstance(value, StageRef)
        default_output = self.stage.INPUTS[field_path][1]
        return self.upstream_outputs[value.from_][value.output or default_output]

    def spawn(self, role: str, cls: type, *args: Any, **kwargs: Any) -> ActorGroup:
        """Start the actor group of ``role`` as the stage's plan places it; shut down when the stage ends."""
        if self.placement is None:
            self.placement = StagePlacement(plan_stage(self.stage))
        r = self.placement.plan.role(role)
        group = ActorGroup(role, cls, r.num_workers, WorkerResources(r.cpus_per_worker, r.gpus_per_worker), *args,
                           placement=self.placement.acquire(role), **kwargs)
        self.groups.append(group)
        return group

    def release(self, group: ActorGroup) -> None:
        """Shut a group down before the stage ends (to free its resources for the next role)."""
        group.shutdown()
        self.groups.remove(group)
        if self.placement is not None:
            self.placement.release(group.role)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(metrics, step)
        for name, value in metrics.items():
            self.metrics_history.setdefault(name, []).append((step, float(value)))

    def report_progress(self, step: int, total: int, metrics: dict[str, float]) -> None:
        if self.progress is not None:
            self.progress(step, total, metrics)

    @contextmanager
    def timed(self, phase: str, sink: dict[str, float]) -> Iterator[None]:
        """Time a named phase into ``sink["timing/<phase>_s"]``."""
        start = time.perf_counter()
        yield
        sink[f"timing/{phase}_s"] = time.perf_counter() - start

    def close(self) -> None:
        for group in self.groups:
            group.shutdown()
        self.groups.clear()
        if self.placement is not None:
            self.placement.close()
