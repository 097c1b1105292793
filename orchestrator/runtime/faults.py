"""Deadlines and in-stage recovery: what a remote call may wait, how often a role may be replaced,
where the driver is when something fails, and the record of every fault.

Every call an ``ActorGroup`` makes waits at most ``call_timeout_s`` (``setup_timeout_s`` for the
calls that load a model); a call past its deadline is a ``FaultError`` naming the role, the ranks
still pending, the method, and the driver's position (phase, iteration, weight version), never a
hang. What a dead rank means (replaced in place, or a rollback) is the ``recovery.Supervisor``'s to
decide, up to ``max_restarts`` times per role and stage; each recovery is a ``FaultEvent`` the stage logs.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pipelines.errors import UserError


class FaultError(UserError):
    """A role hung past its deadline or failed past its restart budget. The stage's last good
    checkpoint is kept: ``rlhf run --resume`` continues from it."""


class RankLost(FaultError):
    """A rank of a role that holds training state (a trainer, a critic) died. The stage recovers by
    rebuilding its trainer groups from the last in-stage checkpoint (``Supervisor.rollback``)."""

    def __init__(self, message: str, event: FaultEvent) -> None:
        super().__init__(message)
        self.event = event


@dataclass(frozen=True)
class FaultPolicy:
    """Deadlines and the restart budget of one stage's actor groups."""

    max_restarts: int = 3
    call_timeout_s: float = 600.0
    setup_timeout_s: float = 1800.0


@dataclass
class FaultEvent:
    """One replaced rank: what died, where the driver was, and how long the replacement took."""

    role: str
    rank: int
    node: str
    error: str
    where: dict[str, Any]
    recovery_s: float = 0.0

    def describe(self) -> str:
        place = describe_where(self.where)
        return (f"{self.role} rank {self.rank} on node {self.node} died ({self.error}){place}; "
                f"replaced in {self.recovery_s:.1f}s")

    def tag(self) -> str:
        """The MLflow tag value: role, rank, node, phase, iteration, recovery time."""
        return (f"role={self.role} rank={self.rank} node={self.node} phase={self.where.get('phase', '-')} "
                f"iteration={self.where.get('iteration', '-')} recovery_s={self.recovery_s:.2f}")


@dataclass
class FaultLog:
    """Events of one stage, in order; the stage logs the ones not yet logged with its next metrics."""

    events: list[FaultEvent] = field(default_factory=list)
    logged: int = 0

    def restarts(self, role: str) -> int:
        return sum(e.role == role for e in self.events)

    def new(self) -> list[FaultEvent]:
        fresh = self.events[self.logged :]
        self.logged = len(self.events)
        return fresh


_WHERE: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("rlhf_where", default={})


@contextmanager
def at(**position: Any) -> Iterator[None]:
    """Mark where the driver is (``phase``, ``iteration``, ``version``) for the calls made inside."""
    token = _WHERE.set(_WHERE.get() | position)
    try:
        yield
    finally:
        _WHERE.reset(token)


def where() -> dict[str, Any]:
    return dict(_WHERE.get())


def describe_where(position: dict[str, Any]) -> str:
    names = (("phase", "phase"), ("iteration", "iteration"), ("step", "step"), ("version", "weight version"))
    parts = [f"{label} {position[key]}" for key, label in names if key in position]
    return f" ({', '.join(parts)})" if parts else ""


class Deadline:
    """Seconds left of one wait that may span several ``ray.wait`` calls."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())
