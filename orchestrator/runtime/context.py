"""What a stage's ``run(config, ctx)`` receives: its directory and inputs, and three parts with one
job each, sharing the stage's recovery ``Supervisor``:

- ``log`` (``StageLog``): metrics (exactly once), tables, artifacts, progress, phase spans;
- ``roles`` (``StageRoles``): spawning its actor groups as the plan places them, the pool;
- ``checkpoints`` (``Checkpoints``): in-stage checkpoints, resume and rollback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.runtime.checkpoints import Checkpoints
from orchestrator.runtime.faults import FaultPolicy
from orchestrator.runtime.placement import StagePlan
from orchestrator.runtime.placement_groups import StagePlacement
from orchestrator.runtime.recovery import Supervisor
from orchestrator.runtime.stage_log import StageLog
from orchestrator.runtime.stage_roles import GroupPool, StageRoles
from orchestrator.runtime.tracking import Tracker


@dataclass
class StageContext:
    """Handed to a stage's ``run(config, ctx)``; the stage returns its outputs (name → path)."""

    stage_dir: Path
    resolve: Callable[[str], str | None]  # an input field (``data.train``) → its path
    log: StageLog
    roles: StageRoles
    checkpoints: Checkpoints
    seed: int = 0
    name: str = "stage"  # the stage's name, for messages

    def input(self, field_path: str) -> str | None:
        """Resolve an input field (e.g. ``data.train``) to a path: a literal or an upstream output."""
        return self.resolve(field_path)

    @property
    def timeout_s(self) -> float:
        """The deadline of one remote call (``fault_tolerance.call_timeout_s``)."""
        return self.roles.supervisor.policy.call_timeout_s

    @classmethod
    def open(cls, stage_dir: Path, plan: StagePlan, *, resolve: Callable[[str], str | None] = lambda _: None,
             tracker: Tracker | None = None, policy: FaultPolicy | None = None, checkpoint_every: int = 0,
             progress: Callable[[int, int, dict[str, float]], None] | None = None, pool: GroupPool | None = None,
             next_plan: StagePlan | None = None, placement_timeout_s: float = 120.0, seed: int = 0,
             name: str = "stage") -> StageContext:
        """The context of one stage run: its supervisor, log, roles and checkpoints."""
        supervisor = Supervisor(policy)
        log = StageLog(tracker, buffered=bool(checkpoint_every), supervisor=supervisor, progress=progress)
        roles = StageRoles(StagePlacement(plan, timeout_s=placement_timeout_s), supervisor, pool=pool,
                           next_plan=next_plan)
        checkpoints = Checkpoints(stage_dir / "checkpoint", checkpoint_every, log, supervisor)
        return cls(stage_dir, resolve, log, roles, checkpoints, seed, name)

    def close(self, succeeded: bool = False) -> None:
        """Shut the stage's groups down (parking what the next stage keeps); tag where they ran."""
        tags = self.roles.close(succeeded)
        if tags and self.log.tracker is not None:
            self.log.tracker.set_tags(tags)
