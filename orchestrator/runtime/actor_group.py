"""Actor groups: a role class wrapped with ray.remote at spawn time, placed with a placement group.

Calls name the method by reference (``group.broadcast(PolicyTrainer.setup, ...)``), never by a
free-form string, and go through one of three dispatch modes:

- ``broadcast``: the same arguments to every rank;
- ``shard``: the i-th item of a list to rank i (data parallelism);
- ``rank0``: only rank 0;
- ``balanced``: items go to whichever rank has the least pending work (rollout workers).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.runtime.faults import (
    REPLACEABLE_ROLES,
    Deadline,
    FaultError,
    FaultEvent,
    FaultLog,
    FaultPolicy,
    RankLost,
    describe_where,
    where,
)
from orchestrator.runtime.placement import BundleGroup, StagePlan, format_resources, pinned_to, placeable
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


def _pinned(group: BundleGroup) -> bool:
    """Whether the group's bundles ask for a node's custom resource (``placement.nodes``)."""
    return any(pinned_to(b) for b in group.bundles)


def bundle_nodes(pg: PlacementGroup) -> dict[int, str]:
    """Bundle index → the (short) id of the node Ray placed it on."""
    return {i: str(node)[:12] for i, node in ray.util.placement_group_table(pg).get("bundles_to_node_id", {}).items()}


class StagePlacement:
    """The placement groups of one stage's plan, reserved when their first role starts.

    Roles in a colocation set share one placement group; it is freed when the last of them stops.
    """

    def __init__(self, plan: StagePlan, timeout_s: float = 120.0) -> None:
        self.plan = plan
        self.timeout_s = timeout_s
        self._held: dict[tuple[str, ...], tuple[PlacementGroup, set[str]]] = {}
        self.nodes: dict[str, list[str]] = {}  # "role+role" -> the node id of each bundle, as placed

    def acquire(self, role: str) -> PlacementGroup:
        group = self.plan.group_of(role)
        if group.roles not in self._held and not _pinned(group):
            # The groups pinned to a node go first, so that an unpinned one cannot take their node's room.
            for other in self.plan.phase_groups(next((p for p in self.plan.phases if role in p), (role,))):
                if _pinned(other) and other.roles not in self._held:
                    self._reserve(other)
        if group.roles not in self._held:
            self._reserve(group)
        pg, users = self._held[group.roles]
        users.add(role)
        return pg

    def _reserve(self, group: BundleGroup) -> None:
        bundles = [{k: v for k, v in b.items() if v} for b in group.bundles]
        pg = reserve(bundles, group.strategy, "+".join(group.roles), self.timeout_s)
        self._held[group.roles] = (pg, set())
        placed = bundle_nodes(pg)
        self.nodes["+".join(group.roles)] = [placed.get(i, "?") for i in range(len(bundles))]

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
        """Take over a placement group detached by the previous stage for ``role`` (freeing one this
        stage reserved for it ahead, as for a pinned role)."""
        ahead = self._held.get((role,))
        if ahead is not None and not ahead[1]:
            remove_placement_group(ahead[0])
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
    """Calls already submitted to a group's ranks; ``get()`` waits (within the group's deadline) and
    returns results in rank order."""

    def __init__(self, group: ActorGroup, name: str, calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]],
                 timeout_s: float) -> None:
        self.group, self.name, self.calls, self.timeout_s = group, name, calls, timeout_s
        self.refs = {rank: (group.actors[rank], group._submit(rank, name, *a, **k)) for rank, (a, k) in calls.items()}

    def get(self) -> list[Any]:
        results: dict[int, Any] = {}
        pending = dict(self.refs)
        deadline = Deadline(self.timeout_s)
        while pending:
            rank_of = {ref: rank for rank, (_, ref) in pending.items()}
            ready, _ = ray.wait(list(rank_of), num_returns=len(rank_of), timeout=deadline.left())
            if not ready:
                raise self.group._timeout_error(self.name, sorted(pending), self.timeout_s)
            for ref in ready:  # one wait per call while every rank answers
                rank = rank_of[ref]
                try:
                    results[rank] = ray.get(ref)
                except RayActorError as exc:
                    self.group._recover(rank, exc, pending[rank][0])
                    args, kwargs = self.calls[rank]
                    pending[rank] = (self.group.actors[rank], self.group._submit(rank, self.name, *args, **kwargs))
                    deadline = Deadline(self.timeout_s)
                    continue
                del pending[rank]
        return [results[rank] for rank in sorted(self.calls)]

    def done(self) -> bool:
        """Whether every rank has answered (a result or an error); does not wait."""
        refs = [ref for _, ref in self.refs.values()]
        return len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs)


def wait_any(pendings: Sequence[Pending], timeout_s: float) -> list[int]:
    """Indices of the ``pendings`` whose every rank has answered, waiting up to ``timeout_s`` for at
    least one (an empty list after the wait: their ``get()`` raises the deadline error)."""
    deadline = Deadline(timeout_s)
    while True:
        done = [i for i, p in enumerate(pendings) if p.done()]
        if done or not deadline.left():
            return done
        refs = [ref for p in pendings for _, ref in p.refs.values()]
        answered = len(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
        if answered < len(refs):  # else one finished since the check above
            ray.wait(refs, num_returns=answered + 1, timeout=deadline.left())  # until one more rank answers


class ActorGroup:
    """N ranks of one role class. ``cls(rank, world_size, *args, **kwargs)`` builds each rank.

    Every call waits at most ``policy.call_timeout_s`` (``setup`` calls ``policy.setup_timeout_s``).
    A rank of a replaceable role (``faults.REPLACEABLE_ROLES``) that dies is replaced in its bundle:
    the new actor replays the group's ``setup`` calls, then the ``on_replace`` hooks (e.g. the
    weight sync pushes the current weights), and the lost call runs again on it.
    """

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
        policy: FaultPolicy | None = None,
        faults: FaultLog | None = None,
        **kwargs: Any,
    ) -> None:
        """Without ``placement`` the group reserves (and on shutdown frees) its own placement group of
        one bundle per rank; with it, rank i runs in bundle i of that shared group."""
        self.role = role
        self.cls = cls
        self.num_workers = num_workers
        self.resources = resources
        self.policy = policy or FaultPolicy()
        self.faults = faults if faults is not None else FaultLog()
        self.on_replace: list[Callable[[ActorGroup, int], None]] = []
        self.on_rebuild: Callable[[ActorGroup], None] | None = None  # sets up a rebuilt group (its rendezvous)
        self._setup_calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self._pg: PlacementGroup | None = None
        self.placement_timeout_s = placement_timeout_s
        if placement is None:
            self._pg = reserve([resources.bundle() for _ in range(num_workers)], "PACK", role, placement_timeout_s)
        self._placement = placement or self._pg
        self._runtime_env = {"env_vars": dict(env_vars)} if env_vars else None
        self._remote_cls = ray.remote(cls)
        self._init_args, self._init_kwargs = args, kwargs
        self.actors = [self._create(i) for i in range(num_workers)]

    def _create(self, rank: int) -> Any:
        return self._remote_cls.options(
            num_cpus=self.resources.num_cpus,
            num_gpus=self.resources.num_gpus,
            name=None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._placement, placement_group_bundle_index=rank),
            runtime_env=self._runtime_env,
        ).remote(rank, self.num_workers, *self._init_args, **self._init_kwargs)

    # ------------------------------------------------------------ deadlines and replacement

    def _submit(self, rank: int, name: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.actors[rank], name).remote(*args, **kwargs)

    def _timeout_error(self, name: str, ranks: list[int], timeout_s: float) -> FaultError:
        return FaultError(f"{self.role} rank(s) {ranks}: {name} did not return within {timeout_s:g}s"
                         f"{describe_where(where())} (fault_tolerance.call_timeout_s)")

    def _node_of(self, rank: int) -> str:
        try:
            return bundle_nodes(self._placement).get(rank, "?")
        except Exception:  # the table is only for the message
            return "?"

    def _wait_for_bundle(self, rank: int, position: dict[str, Any]) -> None:
        """Until the rank's bundle is placed on a live node: Ray re-places the bundles of a lost node
        where the cluster still has room. Raises a FaultError naming the demand and what is left when
        it has not within the placement timeout."""
        deadline = Deadline(self.placement_timeout_s)
        while True:
            table = ray.util.placement_group_table(self._placement)
            node = table.get("bundles_to_node_id", {}).get(rank)
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            if table.get("state") == "CREATED" and node in alive:
                return
            if not deadline.left():
                bundle = format_resources(table.get("bundles", {}).get(rank, {}))
                nodes = [format_resources(placeable(n["Resources"])) for n in ray.nodes() if n.get("Alive")]
                free = format_resources(placeable(ray.available_resources()))
                raise FaultError(f"{self.role} rank {rank} died{describe_where(position)} and its bundle {bundle} "
                                 f"cannot be placed again within {self.placement_timeout_s:g}s (a node lost?); the "
                                 f"cluster has {len(nodes)} live node(s) [{', '.join(nodes)}] with {free} free. "
                                 "Continue later with `rlhf run --resume` (`rlhf submit --resume RUN_ID`)")
            time.sleep(0.5)

    def _recover(self, rank: int, exc: RayActorError, actor: Any) -> None:
        """After a call to ``actor`` (rank ``rank``) failed: nothing when that actor was already replaced
        (the error is an older call's); a short wait when Ray reports it unavailable for now (its node
        is unreachable: it is retried, and reported dead if the node is lost); else ``_replace``."""
        if actor is not self.actors[rank]:
            return
        if isinstance(exc, ActorUnavailableError):
            time.sleep(1.0)
            return
        self._replace(rank, exc)

    def _replace(self, rank: int, exc: BaseException) -> None:
        """Replace dead ``rank`` in its bundle; raise ``RankLost`` when the role holds training state
        (the stage then rolls back), a FaultError when the restart budget is spent."""
        position = where()
        error = type(exc).__name__
        done = self.faults.restarts(self.role)
        if self.role not in REPLACEABLE_ROLES:
            raise RankLost(f"{self.role} rank {rank} died{describe_where(position)} ({error}); a {self.role} holds "
                           "training state: the stage rolls back to its last in-stage checkpoint",
                           FaultEvent(self.role, rank, self._node_of(rank), error, position)) from None
        if done >= self.policy.max_restarts:
            raise FaultError(f"{self.role} rank {rank} died{describe_where(position)} ({error}) after "
                             f"{done} replacement(s): fault_tolerance.max_restarts = {self.policy.max_restarts} "
                             "is spent") from None
        start = time.perf_counter()
        event = FaultEvent(self.role, rank, self._node_of(rank), error, position)
        ray.kill(self.actors[rank], no_restart=True)
        self._wait_for_bundle(rank, position)
        self.actors[rank] = self._create(rank)
        for name, args, kwargs in self._setup_calls:
            Pending(self, name, {rank: (args, kwargs)}, self.policy.setup_timeout_s).get()
        for hook in self.on_replace:
            hook(self, rank)
        event.recovery_s = time.perf_counter() - start
        self.faults.events.append(event)
        print(f"fault: {event.describe()}", flush=True)

    # ------------------------------------------------------------ dispatch

    def _method_name(self, method: Callable[..., Any]) -> str:
        name = getattr(method, "__name__", None)
        if name is None or getattr(self.cls, name, None) is not method:
            raise TypeError(f"{method!r} is not a method of {self.cls.__name__}")
        return name

    def setup(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """``broadcast`` with the setup deadline; the call is replayed on a rank that replaces a dead one."""
        return self.setup_async(method, *args, **kwargs).get()

    def setup_async(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Pending:
        """``setup`` without waiting, so other groups can set up meanwhile; ``get()`` the result."""
        name = self._method_name(method)
        if (name, args, kwargs) not in self._setup_calls:  # a group kept from the last stage is set up again
            self._setup_calls.append((name, args, kwargs))
        calls = {rank: (args, kwargs) for rank in range(self.num_workers)}
        return Pending(self, name, calls, self.policy.setup_timeout_s)

    def broadcast(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``method`` on every rank with the same arguments; results in rank order."""
        calls = {rank: (args, kwargs) for rank in range(self.num_workers)}
        return Pending(self, self._method_name(method), calls, self.policy.call_timeout_s).get()

    def on_ranks(self, ranks: Sequence[int], method: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``method`` with the same arguments on some ranks; results in rank order."""
        calls = {rank: (args, kwargs) for rank in ranks}
        return Pending(self, self._method_name(method), calls, self.policy.call_timeout_s).get()

    def shard(self, method: Callable[..., Any], shards: Sequence[Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``method(shards[i], *args, **kwargs)`` on rank i; results in rank order."""
        return self.shard_async(method, shards, *args, **kwargs).get()

    def shard_async(self, method: Callable[..., Any], shards: Sequence[Any], *args: Any, **kwargs: Any) -> Pending:
        """``shard`` without waiting: other groups can work meanwhile (e.g. the critic beside the policy)."""
        if len(shards) != self.num_workers:
            raise ValueError(f"{len(shards)} shards for {self.num_workers} {self.role} workers")
        calls = {rank: ((shard, *args), kwargs) for rank, shard in enumerate(shards)}
        return Pending(self, self._method_name(method), calls, self.policy.call_timeout_s)

    def rank0(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` on rank 0 only."""
        return self.on_ranks([0], method, *args, **kwargs)[0]

    def balanced(self, method: Callable[..., Any], items: Sequence[Any], *args: Any, in_flight_per_worker: int = 1,
                 on_result: Callable[[int, Any], None] | None = None, **kwargs: Any) -> list[Any]:
        """Call ``method(item, *args, **kwargs)`` for every item; results in item order.

        Each rank holds at most ``in_flight_per_worker`` pending items; the next item goes to the
        first rank that finishes one, so a slow or busy rank gets fewer items. The items a dead rank
        held are dispatched again once it is replaced; no item waits past the call deadline.
        ``on_result(index, result)`` is called as each item's result arrives (in arrival order).
        """
        name = self._method_name(method)
        results: list[Any] = [None] * len(items)
        owner: dict[Any, tuple[int, int, Any]] = {}  # pending ref -> (item index, rank, actor)
        queue = list(range(len(items)))
        free = [rank for rank in range(self.num_workers) for _ in range(in_flight_per_worker)]
        deadline = Deadline(self.policy.call_timeout_s)
        while queue or owner:
            while free and queue:
                rank, index = free.pop(0), queue.pop(0)
                owner[self._submit(rank, name, items[index], *args, **kwargs)] = (index, rank, self.actors[rank])
            ready, _ = ray.wait(list(owner), num_returns=1, timeout=deadline.left())
            if not ready:
                raise self._timeout_error(name, sorted({rank for _, rank, _ in owner.values()}), self.policy.call_timeout_s)
            index, rank, actor = owner.pop(ready[0])
            try:
                results[index] = ray.get(ready[0])
            except RayActorError as exc:
                lost = [i for i, r, a in owner.values() if r == rank and a is actor]
                owner = {ref: (i, r, a) for ref, (i, r, a) in owner.items() if not (r == rank and a is actor)}
                self._recover(rank, exc, actor)
                queue[:0] = sorted([index, *lost])
                free = [r for r in free if r != rank] + [rank] * (in_flight_per_worker - sum(
                    r == rank for _, r, _ in owner.values()))
            else:
                free.append(rank)
                if on_result is not None:
                    on_result(index, results[index])
            deadline = Deadline(self.policy.call_timeout_s)
        return results

    def get(self, refs: list[Any]) -> list[Any]:
        """Wait for refs this group's ``broadcast_refs`` returned, within the call deadline."""
        try:
            return ray.get(refs, timeout=self.policy.call_timeout_s)
        except GetTimeoutError:
            raise self._timeout_error("a call", list(range(self.num_workers)), self.policy.call_timeout_s) from None

    def broadcast_refs(self, method: Callable[..., Any], num_returns: int, *args: Any, **kwargs: Any) -> list[list[Any]]:
        """Like ``broadcast`` but leave the results in the object store: per rank, ``num_returns`` refs.

        Passing such a ref as a top-level argument to another group's method moves the object
        between actors without the driver ever holding it (how weights travel to rollout workers).
        """
        name = self._method_name(method)
        refs = [getattr(a, name).options(num_returns=num_returns).remote(*args, **kwargs) for a in self.actors]
        return [r if isinstance(r, list) else [r] for r in refs]

    def rebuild(self) -> None:
        """Replace every rank in its bundle (the ranks of a trainer group share a process group that
        dies with any of them), then set the new ranks up with ``on_rebuild``."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = [self._create(i) for i in range(self.num_workers)]
        self._setup_calls.clear()
        if self.on_rebuild is not None:
            self.on_rebuild(self)

    def shutdown(self) -> None:
        """Kill the actors and free their placement group (idempotent)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

