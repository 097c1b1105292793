"""Actor groups: a role class wrapped with ray.remote at spawn time, placed with a placement group.

Calls name the method by reference (``group.broadcast(PolicyTrainer.setup, ...)``), never by a
free-form string, and go through one of three dispatch modes:

- ``broadcast``: the same arguments to every rank;
- ``shard``: the i-th item of a list to rank i (data parallelism);
- ``rank0``: only rank 0;
- ``balanced``: items go to whichever rank has the least pending work (rollout workers).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.runtime.placement import StagePlan
from orchestrator.runtime.resources import WorkerResources
from pipelines.errors import UserError


def reserve(bundles: list[dict[str, float]], strategy: str, name: str, timeout_s: float) -> PlacementGroup:
    """A ready placement group, or a UserError naming what was asked and what the cluster has free."""
    pg = placement_group(bundles, strategy=strategy, name=f"{name}-{uuid.uuid4().hex[:8]}")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise UserError(
            f"cannot place {name}: {len(bundles)} bundle(s) {bundles} ({strategy}) not ready within "
            f"{timeout_s:.0f}s; cluster resources available: {ray.available_resources()}"
        ) from None
    return pg


class StagePlacement:
    """The placement groups of one stage's plan, reserved when their first role starts.

    Roles in a colocation set share one placement group; it is freed when the last of them stops.
    """

    def __init__(self, plan: StagePlan, timeout_s: float = 120.0) -> None:
        self.plan = plan
        self.timeout_s = timeout_s
        self._held: dict[tuple[str, ...], tuple[PlacementGroup, set[str]]] = {}

    def acquire(self, role: str) -> PlacementGroup:
        group = self.plan.group_of(role)
        if group.roles not in self._held:
            bundles = [{k: v for k, v in b.items() if v} for b in group.bundles]
            pg = reserve(bundles, group.strategy, "+".join(group.roles), self.timeout_s)
            self._held[group.roles] = (pg, set())
        pg, users = self._held[group.roles]
        users.add(role)
        return pg

    def release(self, role: str) -> None:
        group = self.plan.group_of(role)
        if group.roles not in self._held:
            return
        pg, users = self._held[group.roles]
        users.discard(role)
        if not users:
            remove_placement_group(pg)
            del self._held[group.roles]

    def close(self) -> None:
        for pg, _ in self._held.values():
            remove_placement_group(pg)
        self._held.clear()

    def detach(self, role: str) -> PlacementGroup | None:
        """Hand over the placement group of ``role`` when the role has one to itself (the group
        is then no longer this stage's to free); None when it shares one or holds none."""
        held = self._held.get((role,))
        if held is None or held[1] != {role}:
            return None
        del self._held[(role,)]
        return held[0]

    def adopt(self, role: str, pg: PlacementGroup) -> None:
        """Take over a placement group detached by the previous stage for ``role``."""
        self._held[(role,)] = (pg, {role})


# Roles whose actors hold nothing a stage changes (frozen weights, a function): a group of one of
# them may serve the next stage too. Trainers and rollout workers (whose weights a stage syncs) never.
STATELESS_ROLES = ("reference", "reward")


class GroupPool:
    """Groups of stateless roles kept alive from one stage to the next (with their placement groups).

    A stage claims a parked group when it spawns the same role with the same class, arguments and
    resources; whatever it does not claim is shut down once it starts a role outside its first
    phase, or when it ends, so parked groups never hold resources a later phase needs.
    """

    def __init__(self) -> None:
        self._parked: dict[str, tuple[ActorGroup, PlacementGroup, tuple[Any, ...]]] = {}

    def park(self, group: ActorGroup, pg: PlacementGroup, key: tuple[Any, ...]) -> None:
        self._parked[group.role] = (group, pg, key)

    def claim(self, role: str, key: tuple[Any, ...]) -> tuple[ActorGroup, PlacementGroup] | None:
        parked = self._parked.pop(role, None)
        if parked is None:
            return None
        group, pg, parked_key = parked
        if parked_key == key:
            return group, pg
        _shutdown_parked(group, pg)
        return None

    def release_all(self) -> None:
        for group, pg, _ in self._parked.values():
            _shutdown_parked(group, pg)
        self._parked.clear()

    def __contains__(self, role: str) -> bool:
        return role in self._parked


def _shutdown_parked(group: ActorGroup, pg: PlacementGroup) -> None:
    group.shutdown()
    remove_placement_group(pg)


class Pending:
    """Calls already submitted to a group's ranks; ``get()`` waits and returns results in rank order."""

    def __init__(self, refs: list[Any]) -> None:
        self.refs = refs

    def get(self) -> list[Any]:
        return ray.get(self.refs)


class ActorGroup:
    """N ranks of one role class. ``cls(rank, world_size, *args, **kwargs)`` builds each rank."""

    def __init__(
        self,
        role: str,
        cls: type,
        num_workers: int,
        resources: WorkerResources,
        *args: Any,
        placement_timeout_s: float = 120.0,
        env_vars: dict[str, str] | None = None,
        placement: PlacementGroup | None = None,
        **kwargs: Any,
    ) -> None:
        """Without ``placement`` the group reserves (and on shutdown frees) its own placement group of
        one bundle per rank; with it, rank i runs in bundle i of that shared group."""
        self.role = role
        self.cls = cls
        self.num_workers = num_workers
        self.resources = resources
        self._pg: PlacementGroup | None = None
        if placement is None:
            self._pg = reserve([resources.bundle() for _ in range(num_workers)], "PACK", role, placement_timeout_s)
        pg = placement or self._pg
        runtime_env = {"env_vars": dict(env_vars)} if env_vars else None
        remote_cls = ray.remote(cls)
        self.actors = [
            remote_cls.options(
                num_cpus=resources.num_cpus,
                num_gpus=resources.num_gpus,
                name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
                runtime_env=runtime_env,
            ).remote(i, num_workers, *args, **kwargs)
            for i in range(num_workers)
        ]

    def _method_name(self, method: Callable[..., Any]) -> str:
        name = getattr(method, "__name__", None)
        if name is None or getattr(self.cls, name, None) is not method:
            raise TypeError(f"{method!r} is not a method of {self.cls.__name__}")
        return name

    def broadcast(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``method`` on every rank with the same arguments; results in rank order."""
        name = self._method_name(method)
        return ray.get([getattr(a, name).remote(*args, **kwargs) for a in self.actors])

    def shard(self, method: Callable[..., Any], shards: Sequence[Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``method(shards[i], *args, **kwargs)`` on rank i; results in rank order."""
        return self.shard_async(method, shards, *args, **kwargs).get()

    def shard_async(self, method: Callable[..., Any], shards: Sequence[Any], *args: Any, **kwargs: Any) -> Pending:
        """``shard`` without waiting: other groups can work meanwhile (e.g. the critic beside the policy)."""
        if len(shards) != self.num_workers:
            raise ValueError(f"{len(shards)} shards for {self.num_workers} {self.role} workers")
        name = self._method_name(method)
        return Pending([getattr(a, name).remote(s, *args, **kwargs) for a, s in zip(self.actors, shards)])

    def rank0(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` on rank 0 only."""
        return ray.get(getattr(self.actors[0], self._method_name(method)).remote(*args, **kwargs))

    def balanced(self, method: Callable[..., Any], items: Sequence[Any], *args: Any, in_flight_per_worker: int = 1,
                 **kwargs: Any) -> list[Any]:
        """Call ``method(item, *args, **kwargs)`` for every item; results in item order.

        Each rank holds at most ``in_flight_per_worker`` pending items; the next item goes to the
        first rank that finishes one, so a slow or busy rank gets fewer items.
        """
        name = self._method_name(method)
        results: list[Any] = [None] * len(items)
        owner: dict[Any, tuple[int, int]] = {}  # pending ref -> (item index, rank)
        next_item = 0
        free = [rank for rank in range(self.num_workers) for _ in range(in_flight_per_worker)]
        while next_item < len(items) or owner:
            while free and next_item < len(items):
                rank = free.pop(0)
                ref = getattr(self.actors[rank], name).remote(items[next_item], *args, **kwargs)
                owner[ref] = (next_item, rank)
                next_item += 1
            (done,), _ = ray.wait(list(owner), num_returns=1)
            index, rank = owner.pop(done)
            results[index] = ray.get(done)
            free.append(rank)
        return results

    def broadcast_refs(self, method: Callable[..., Any], num_returns: int, *args: Any, **kwargs: Any) -> list[list[Any]]:
        """Like ``broadcast`` but leave the results in the object store: per rank, ``num_returns`` refs.

        Passing such a ref as a top-level argument to another group's method moves the object
        between actors without the driver ever holding it (how weights travel to rollout workers).
        """
        name = self._method_name(method)
        refs = [getattr(a, name).options(num_returns=num_returns).remote(*args, **kwargs) for a in self.actors]
        return [r if isinstance(r, list) else [r] for r in refs]

    def shutdown(self) -> None:
        """Kill the actors and free their placement group (idempotent)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

