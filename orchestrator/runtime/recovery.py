"""One owner for a stage's recovery: the ``Supervisor``.

What it owns, in one place:

- **replacement**: a rank of a replaceable role (its class declares ``REPLACEABLE = True``: rollout,
  reward, reference) that dies is killed for good, created again in its bundle (after its node's
  bundle is placed again), its group's setup calls are replayed on it, and then what the role needs
  beyond its setup (``after_replace``: the weight sync catches a rollout rank up to the served
  version; the evaluate stage loads the checkpoint it serves) before the lost call runs again;
- **rollback**: a rank of a role that holds training state (a trainer, a critic) that dies raises
  ``RankLost``; the stage's loop hands it to ``rollback``, which rebuilds every trainer group (all
  ranks: they share a process group), sets them up again and restores the last in-stage checkpoint;
- **the restart budget** (``fault_tolerance.max_restarts`` per role and stage) and **the event log**
  (``FaultLog``: every replaced rank and rollback, logged with the stage's next metrics and tagged on
  its run);
- **reporting**: each recovery is one line on the ``rlhf.faults`` logger (the console shows it and
  writes it to the stage's log).

``ActorGroup`` detects a dead rank in its one resubmission primitive (``actor_group.Calls``) and asks
the supervisor; nothing else in the runtime decides what a fault means.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from orchestrator.runtime.faults import (
    FaultError,
    FaultEvent,
    FaultLog,
    FaultPolicy,
    RankLost,
    describe_where,
    where,
)

LOG = logging.getLogger("rlhf.faults")


class Recoverable(Protocol):
    """What the supervisor does with a group (``actor_group.ActorGroup`` is one)."""

    role: str
    cls: type

    def node_of(self, rank: int) -> str: ...

    def respawn(self, rank: int) -> None: ...

    def replay_setup(self, rank: int) -> None: ...

    def rebuild(self) -> None: ...


# What a replaced rank needs beyond the replay of its group's setup calls.
AfterReplace = Callable[[Any, int], None]
# What a rebuilt trainer group needs to be set up (its ranks load the model and join one process group).
Rebuild = Callable[[Any], Any]


def replaceable(cls: type) -> bool:
    """Whether a dead rank of a role class may be replaced in place: its ``REPLACEABLE`` class attribute
    (roles that hold nothing a stage changes but served weights); False when it declares none."""
    return bool(getattr(cls, "REPLACEABLE", False))


def stateless(cls: type) -> bool:
    """Whether a group of a role class may serve the next stage too (``STATELESS``: frozen weights, a
    function); trainers and rollout workers (whose weights a stage syncs) never."""
    return bool(getattr(cls, "STATELESS", False))


class Supervisor:
    """Replacement, rollback, the restart budget and the event log of one stage's actor groups."""

    def __init__(self, policy: FaultPolicy | None = None, events: FaultLog | None = None) -> None:
        self.policy = policy or FaultPolicy()
        self.events = events if events is not None else FaultLog()
        self._after: dict[int, list[AfterReplace]] = {}  # id(group) -> its hooks, in order
        self._setup: dict[int, Rebuild] = {}

    # ------------------------------------------------------------ what roles need

    def after_replace(self, group: Recoverable) -> list[AfterReplace]:
        """The hooks run on a replaced rank of ``group`` after its setup replay (append to add one)."""
        return self._after.setdefault(id(group), [])

    def set_up_with(self, group: Recoverable, rebuild: Rebuild) -> None:
        """How a rebuilt (trainer) group is set up again: its ranks load the model and join one
        process group; ``rebuild`` is also what set the group up first."""
        self._setup[id(group)] = rebuild

    def forget(self, group: Recoverable) -> None:
        """Drop what is known of a group (a group kept for the next stage is adopted by its supervisor)."""
        self._after.pop(id(group), None)
        self._setup.pop(id(group), None)

    # ------------------------------------------------------------ replacement of stateless ranks

    def rank_died(self, group: Recoverable, rank: int, exc: BaseException) -> None:
        """A call found ``rank`` of ``group`` dead: replace it in place, or raise.

        Raises:
            RankLost: the role holds training state; the stage rolls back (``rollback``).
            FaultError: the role's restart budget is spent, or its bundle cannot be placed again.
        """
        position = where()
        error = type(exc).__name__
        event = FaultEvent(group.role, rank, group.node_of(rank), error, position)
        if not replaceable(group.cls):
            raise RankLost(f"{group.role} rank {rank} died{describe_where(position)} ({error}); a {group.role} "
                           "holds training state: the stage rolls back to its last in-stage checkpoint",
                           event) from None
        done = self.events.restarts(group.role)
        if done >= self.policy.max_restarts:
            raise FaultError(f"{group.role} rank {rank} died{describe_where(position)} ({error}) after "
                             f"{done} replacement(s): fault_tolerance.max_restarts = {self.policy.max_restarts} "
                             "is spent") from None
        start = time.perf_counter()
        group.respawn(rank)
        group.replay_setup(rank)
        for hook in self.after_replace(group):
            hook(group, rank)
        self._record(event, time.perf_counter() - start, event.describe)

    # ------------------------------------------------------------ rollback of trainer groups

    def rollback(self, lost: RankLost, trainers: list[Recoverable],
                 restore: Callable[[], tuple[int, dict[str, Any]] | None], *, checkpoints: bool
                 ) -> tuple[int, dict[str, Any]]:
        """A trainer or critic rank died: rebuild every trainer group (the ranks of a group share a
        process group that dies with any of them), set them up again, and ``restore()`` the last
        in-stage checkpoint (None: the stage's starting weights). Returns (the step or iteration to
        continue after, the loop state).

        Raises:
            FaultError: the stage keeps no in-stage checkpoints (``checkpoints`` False: its metrics
                already reached MLflow and would be logged twice), or the role's budget is spent.
        """
        event = lost.event
        if not checkpoints:
            raise FaultError(f"{lost}; but the stage keeps no in-stage checkpoints (checkpoint.every: 0) to roll "
                             "back to") from None
        if self.events.restarts(event.role) >= self.policy.max_restarts:
            raise FaultError(f"{lost}; fault_tolerance.max_restarts = {self.policy.max_restarts} is spent") from None
        start = time.perf_counter()
        for group in trainers:
            group.rebuild()
            setup = self._setup.get(id(group))
            if setup is not None:
                setup(group)
        restored = restore()
        done, state = restored if restored is not None else (0, {})
        origin = f"the checkpoint of step {done}" if done else "the stage start"
        rebuilt = ", ".join(g.role for g in trainers)
        self._record(event, time.perf_counter() - start,
                     lambda: (f"{event.role} rank {event.rank} on node {event.node} died ({event.error})"
                              f"{describe_where(event.where)}; rebuilt {rebuilt} from {origin} in "
                              f"{event.recovery_s:.1f}s"))
        return done, state

    # ------------------------------------------------------------ the event log

    def _record(self, event: FaultEvent, seconds: float, describe: Callable[[], str]) -> None:
        event.recovery_s = seconds
        self.events.events.append(event)
        LOG.warning("fault: %s", describe())

    def restarts(self, role: str) -> int:
        return self.events.restarts(role)

    def unreported(self) -> tuple[dict[str, float], dict[str, str]]:
        """The metrics and run tags of the events since the last call: ``faults/restarts/<role>`` (the
        stage's count so far), ``faults/recovery_s`` and a tag ``rlhf.fault.<n>`` each."""
        fresh = self.events.new()
        if not fresh:
            return {}, {}
        metrics = {f"faults/restarts/{e.role}": float(self.events.restarts(e.role)) for e in fresh}
        metrics["faults/recovery_s"] = sum(e.recovery_s for e in fresh)
        first = len(self.events.events) - len(fresh)
        return metrics, {f"rlhf.fault.{first + i}": e.tag() for i, e in enumerate(fresh)}
