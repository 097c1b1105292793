"""What a stage sees of the driver: its inputs, its directory, actor groups, metrics and progress."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.runtime import faults
from orchestrator.runtime.actor_group import ActorGroup, GroupPool, StagePlacement
from orchestrator.runtime.faults import FaultError, FaultLog, FaultPolicy, RankLost
from orchestrator.runtime.placement import StagePlan, plan_stage
from orchestrator.runtime.resources import WorkerResources
from orchestrator.runtime.tracking import Tracker


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
    reused: list[str] = field(default_factory=list)  # roles taken over from the previous stage
    placement: StagePlacement | None = None
    checkpoint_every: int = 0  # steps or iterations between in-stage checkpoints; 0 = none
    pool: GroupPool | None = None  # stateless groups kept alive between consecutive stages
    next_plan: StagePlan | None = None  # the plan of the stage after this one (what may be kept for it)
    fault_policy: FaultPolicy = field(default_factory=FaultPolicy)  # deadlines and the restart budget
    faults: FaultLog = field(default_factory=FaultLog)  # replaced ranks of this stage's groups
    spans: list[tuple[str, float, float]] = field(default_factory=list)  # (phase, start, end), perf_counter
    _keys: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    _pending: list[tuple[dict[str, float], int]] = field(default_factory=list)
    _deferred: list[Callable[[], None]] = field(default_factory=list)

    def input(self, field_path: str) -> str | None:
        """Resolve an input field (e.g. ``data.train``) to a path: a literal or an upstream output."""
        value = self.stage.field(field_path)
        if value is None or isinstance(value, str):
            return value
        default_output = self.stage.inputs()[field_path][1]
        return self.upstream_outputs[value.from_][value.output or default_output]

    def spawn(self, role: str, cls: type, *args: Any, **kwargs: Any) -> ActorGroup:
        """Start the actor group of ``role`` as the stage's plan places it; shut down when the stage ends
        (or kept for the next stage when the role is stateless and that stage starts the same group).
        A group the previous stage kept with the same class, arguments and resources is taken over."""
        if self.placement is None:
            self.placement = StagePlacement(plan_stage(self.stage))
        plan = self.placement.plan
        r = plan.role(role)
        key = (role, f"{cls.__module__}.{cls.__qualname__}", repr(args), repr(sorted(kwargs.items())), r)
        self._keys[role] = key
        if self.pool is not None:
            if plan.phases and role not in plan.phases[0]:
                self.pool.release_all()  # a later phase needs what the unclaimed parked groups hold
            claimed = self.pool.claim(role, key)
            if claimed is not None:
                group, pg = claimed
                group.policy, group.faults = self.fault_policy, self.faults
                group.on_replace.clear()
                self.placement.adopt(role, pg)
                self.groups.append(group)
                self.reused.append(role)
                return group
        group = ActorGroup(role, cls, r.num_workers, WorkerResources(r.cpus_per_worker, r.gpus_per_worker), *args,
                           placement=self.placement.acquire(role), placement_timeout_s=self.placement.timeout_s,
                           policy=self.fault_policy, faults=self.faults,
                           **kwargs)
        self.groups.append(group)
        return group

    def release(self, group: ActorGroup) -> None:
        """Shut a group down before the stage ends (to free its resources for the next role)."""
        group.shutdown()
        self.groups.remove(group)
        if self.placement is not None:
            self.placement.release(group.role)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record a step's metrics. With in-stage checkpoints they reach MLflow when the next
        checkpoint (or the stage's end) is written: a resumed stage replays the steps after its last
        checkpoint, and their metrics must not be logged twice. Ranks replaced since the last step add
        ``faults/restarts/<role>`` (the stage's count so far), ``faults/recovery_s`` and a tag each."""
        fresh = self.faults.new()
        if fresh:
            metrics = dict(metrics)
            metrics |= {f"faults/restarts/{e.role}": float(self.faults.restarts(e.role)) for e in fresh}
            metrics["faults/recovery_s"] = sum(e.recovery_s for e in fresh)
            first = len(self.faults.events) - len(fresh)
            self.tracker.set_tags({f"rlhf.fault.{first + i}": e.tag() for i, e in enumerate(fresh)})
        if self.checkpoint_every:
            self._pending.append((dict(metrics), step))
        else:
            self.tracker.log_metrics(metrics, step)
        for name, value in metrics.items():
            self.metrics_history.setdefault(name, []).append((step, float(value)))

    def defer(self, log: Callable[[], None]) -> None:
        """Run an MLflow write (a sample table, an artifact) with the step's metrics: at the next
        checkpoint when the stage has them (a replayed step must not append a table twice), else now."""
        if self.checkpoint_every:
            self._deferred.append(log)
        else:
            log()

    def commit_metrics(self) -> None:
        """Send what was held back since the last checkpoint to MLflow."""
        for metrics, step in self._pending:
            self.tracker.log_metrics(metrics, step)
        for log in self._deferred:
            log()
        self._pending.clear()
        self._deferred.clear()
        self.tracker.flush()

    # ------------------------------------------------------------ in-stage checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.stage_dir / "checkpoint"

    def checkpoint_due(self, step: int, total: int) -> bool:
        """Every ``checkpoint_every`` steps, except the last (the stage's outputs are then written)."""
        return bool(self.checkpoint_every) and step % self.checkpoint_every == 0 and step < total

    def save_checkpoint(self, step: int, trainers: list[ActorGroup], state: dict[str, Any]) -> None:
        """Write the trainers' states, the stage loop's ``state`` (JSON) and the metrics since the last
        checkpoint into a new directory that replaces the last good checkpoint in one rename; then
        send those metrics to MLflow."""
        from actors.fsutil import atomic_directory
        from actors.policy_trainer import PolicyTrainer

        with atomic_directory(self.checkpoint_path) as tmp:
            for group in trainers:
                group.broadcast(PolicyTrainer.save_state, str(tmp / group.role))
            (tmp / "metrics.json").write_text(json.dumps(self._pending))
            (tmp / "state.json").write_text(json.dumps({"step": step, "state": state}))
        self.commit_metrics()

    def restore_checkpoint(self, trainers: list[ActorGroup]) -> tuple[int, dict[str, Any]] | None:
        """Load the last good checkpoint into ``trainers``: (its step, the loop state), or None when
        there is none. Its metrics that did not reach MLflow before the crash are logged now."""
        from actors.fsutil import recover_directory
        from actors.policy_trainer import PolicyTrainer

        path = recover_directory(self.checkpoint_path)
        if path is None or not (path / "state.json").is_file():
            return None
        for group in trainers:
            group.broadcast(PolicyTrainer.load_state, str(path / group.role))
        saved = json.loads((path / "state.json").read_text())
        self._log_missing(json.loads((path / "metrics.json").read_text()))
        return int(saved["step"]), saved["state"]

    def recover(self, lost: RankLost, trainers: list[ActorGroup]) -> tuple[int, dict[str, Any]]:
        """A trainer or critic rank died: rebuild every trainer group, load the last in-stage checkpoint
        (or the stage's starting weights when there is none yet) and drop what was held back since it.
        Returns (the step or iteration to continue after, the loop state), as ``restore_checkpoint``.

        Raises:
            FaultError: the stage keeps no in-stage checkpoints (its metrics already reached MLflow and
                would be logged twice), or the role's restart budget is spent.
        """
        event = lost.event
        if not self.checkpoint_every:
            raise FaultError(f"{lost}; but the stage keeps no in-stage checkpoints (checkpoint.every: 0) to roll "
                             "back to") from None
        if self.faults.restarts(event.role) >= self.fault_policy.max_restarts:
            raise FaultError(f"{lost}; fault_tolerance.max_restarts = {self.fault_policy.max_restarts} is spent") from None
        start = time.perf_counter()
        for group in trainers:
            group.rebuild()
        restored = self.restore_checkpoint(trainers)
        done, state = restored if restored is not None else (0, {})
        self._pending = [(m, step) for m, step in self._pending if step <= done]  # steps to run again
        self._deferred.clear()  # their tables and artifacts come again with them
        self.metrics_history = {name: [(s, v) for s, v in points if s <= done]
                                for name, points in self.metrics_history.items()}
        event.recovery_s = time.perf_counter() - start
        self.faults.events.append(event)
        print(f"fault: {event.role} rank {event.rank} on node {event.node} died ({event.error})"
              f"{faults.describe_where(event.where)}; rebuilt {', '.join(g.role for g in trainers)} from "
              f"{'the checkpoint of step ' + str(done) if done else 'the stage start'} in {event.recovery_s:.1f}s",
              flush=True)
        return done, state

    def _log_missing(self, entries: list[list[Any]]) -> None:
        history = self.tracker.metric_history(self.tracker.active_run_id) if self.tracker.active_run_id else {}
        logged = {name: {step for step, _ in points} for name, points in history.items()}
        for metrics, step in entries:
            missing = {k: v for k, v in metrics.items() if step not in logged.get(k, ())}
            if missing:
                self.tracker.log_metrics(missing, step)
        self.tracker.flush()
        self.metrics_history = self.tracker.metric_history(self.tracker.active_run_id)

    def report_progress(self, step: int, total: int, metrics: dict[str, float]) -> None:
        if self.progress is not None:
            self.progress(step, total, metrics)

    @contextmanager
    def timed(self, phase: str, sink: dict[str, float]) -> Iterator[None]:
        """Time a named phase into ``sink["timing/<phase>_s"]`` and its span into ``spans``."""
        start = time.perf_counter()
        with faults.at(phase=phase):
            yield
        self.span(phase, start, time.perf_counter(), sink)

    def span(self, phase: str, start: float, end: float, sink: dict[str, float]) -> None:
        """Record that ``phase`` ran from ``start`` to ``end`` (perf_counter; phases may overlap)."""
        self.spans.append((phase, start, end))
        sink[f"timing/{phase}_s"] = end - start

    def close(self, succeeded: bool = False) -> None:
        """Shut the stage's groups down; after a successful stage, park the stateless ones the next
        stage's first phase starts with the same resources in a placement group of their own. The
        node of every bundle it placed is tagged on the stage's run (``rlhf.placement.<role>[/<role>…]``)."""
        if self.placement is not None and self.placement.nodes and self.tracker is not None:
            self.tracker.set_tags({f"rlhf.placement.{group.replace('+', '/')}": " ".join(nodes)
                                   for group, nodes in self.placement.nodes.items()})
        if self.pool is not None:
            self.pool.release_all()  # parked for this stage and not claimed
        for group in self.groups:
            pg = None
            if succeeded and self.pool is not None and self._keep_for_next(group.role):
                pg = self.placement.detach(group.role) if self.placement is not None else None
            if pg is not None:
                self.pool.park(group, pg, self._keys[group.role])
            else:
                group.shutdown()
        self.groups.clear()
        if self.placement is not None:
            self.placement.close()

    def _keep_for_next(self, role: str) -> bool:
        from orchestrator.runtime.actor_group import STATELESS_ROLES

        nxt = self.next_plan
        if role not in STATELESS_ROLES or nxt is None or not nxt.phases or role not in nxt.phases[0]:
            return False
        if self.placement is None or role not in [r.role for r in nxt.roles]:
            return False
        return nxt.role(role) == self.placement.plan.role(role) and nxt.group_of(role).roles == (role,)
