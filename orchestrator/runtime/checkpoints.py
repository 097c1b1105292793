"""A stage's in-stage checkpoints: what ``rlhf run --resume`` continues an interrupted stage from, and
what a lost trainer rolls back to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from actors.fsutil import atomic_directory, recover_directory
from actors.policy_trainer import PolicyTrainer
from orchestrator.runtime.actor_group import ActorGroup
from orchestrator.runtime.faults import RankLost
from orchestrator.runtime.recovery import Supervisor
from orchestrator.runtime.stage_log import StageLog


class Checkpoints:
    """Every ``every`` steps (offline stages) or iterations (online stages) the trainers' states, the
    loop's state and the metrics held back since the last checkpoint, in ``path`` (0: none)."""

    def __init__(self, path: Path, every: int, log: StageLog, supervisor: Supervisor) -> None:
        self.path, self.every, self.log, self.supervisor = path, every, log, supervisor

    def due(self, step: int, total: int) -> bool:
        """Every ``every`` steps, except the last (the stage's outputs are then written)."""
        return bool(self.every) and step % self.every == 0 and step < total

    def save(self, step: int, trainers: list[ActorGroup], state: dict[str, Any]) -> None:
        """Write the trainers' states, the stage loop's ``state`` (JSON) and the metrics since the last
        checkpoint into a new directory that replaces the last good checkpoint in one rename; then
        send those metrics to MLflow."""
        with atomic_directory(self.path) as tmp:
            for group in trainers:
                group.broadcast(PolicyTrainer.save_state, str(tmp / group.role))
            (tmp / "metrics.json").write_text(json.dumps(self.log.held()))
            (tmp / "state.json").write_text(json.dumps({"step": step, "state": state}))
        self.log.commit()

    def restore(self, trainers: list[ActorGroup]) -> tuple[int, dict[str, Any]] | None:
        """Load the last good checkpoint into ``trainers``: (its step, the loop state), or None when
        there is none. Its metrics that did not reach MLflow before a crash are logged now."""
        path = recover_directory(self.path)
        if path is None or not (path / "state.json").is_file():
            return None
        for group in trainers:
            group.broadcast(PolicyTrainer.load_state, str(path / group.role))
        saved = json.loads((path / "state.json").read_text())
        self.log.replay_missing(json.loads((path / "metrics.json").read_text()))
        return int(saved["step"]), saved["state"]

    def rollback(self, lost: RankLost, trainers: list[ActorGroup]) -> tuple[int, dict[str, Any]]:
        """A trainer or critic rank died: the supervisor rebuilds the trainer groups and this loads the
        last checkpoint (or the stage's starting weights when there is none yet); what was recorded
        after it is dropped. Returns (the step or iteration to continue after, the loop state)."""
        done, state = self.supervisor.rollback(lost, trainers, lambda: self.restore(trainers),
                                               checkpoints=bool(self.every))
        self.log.rewind(done)
        return done, state
