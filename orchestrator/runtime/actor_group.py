"""Actor groups: a role class wrapped with ray.remote at spawn time, placed with a placement group.

Calls name the method by reference (``group.broadcast(PolicyTrainer.setup, ...)``), never by a
free-form string, and go through one of these dispatch modes:

- ``broadcast``: the same arguments to every rank;
- ``shard``: the i-th item of a list to rank i (data parallelism);
- ``rank0``: only rank 0;
- ``balanced``: items go to whichever rank has the least pending work (rollout workers).

Every mode sends its calls through one primitive, ``Calls``: it waits within the deadline, and
when a rank died it asks the stage's ``Supervisor`` (``recovery``) to replace it (or to give up) and
sends the calls that rank held again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.runtime.calls import CALLS
from orchestrator.runtime.faults import Deadline, FaultError, FaultLog, FaultPolicy, describe_where, where
from orchestrator.runtime.placement import format_resources, placeable
from orchestrator.runtime.placement_groups import bundle_nodes, reserve
from orchestrator.runtime.recovery import AfterReplace, Supervisor
from orchestrator.runtime.resources import WorkerResources


@dataclass
class _Call:
    """One call in flight: its key (a rank, or an item's index), the rank it runs on and its arguments."""

    key: int
    rank: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    actor: Any = None


class Calls:
    """Calls of one method in flight on a group's ranks: the one place that waits for them, meets a
    dead rank (the supervisor replaces it, or raises) and sends the calls it held again, to the
    replaced rank. The deadline runs ``timeout_s`` from the sending (and again from a replacement),
    or with ``rolling`` from the last answer (a stream of items)."""

    def __init__(self, group: ActorGroup, name: str, timeout_s: float, *, rolling: bool = False) -> None:
        self.group, self.name, self.timeout_s, self.rolling = group, name, timeout_s, rolling
        self.inflight: dict[Any, _Call] = {}  # ref -> call
        self._deadline = Deadline(timeout_s)

    def send(self, key: int, rank: int, *args: Any, **kwargs: Any) -> None:
        self._submit(_Call(key, rank, args, kwargs))

    def _submit(self, call: _Call) -> None:
        call.actor = self.group.actors[call.rank]
        CALLS.add(self.group.role)
        self.inflight[getattr(call.actor, self.name).remote(*call.args, **call.kwargs)] = call

    def next(self) -> tuple[int, int, Any]:
        """(key, rank, result) of the next call to answer; a call lost with its rank is sent again and
        waited for. Raises the group's deadline error when none answers within ``timeout_s``."""
        while True:
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=self._deadline.left())
            if not ready:
                ranks = sorted({c.rank for c in self.inflight.values()})
                raise self.group.timeout_error(self.name, ranks, self.timeout_s)
            call = self.inflight.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayActorError as exc:
                self.group.recover(call.rank, exc, call.actor)
                self._submit(call)
                self._deadline = Deadline(self.timeout_s)
                continue
            if self.rolling:
                self._deadline = Deadline(self.timeout_s)
            return call.key, call.rank, result

    def refs(self) -> list[Any]:
        return list(self.inflight)

    def __len__(self) -> int:
        return len(self.inflight)


class Pending:
    """Calls already submitted to a group's ranks, one per rank; ``get()`` waits (within the group's
    deadline) and returns results in rank order."""

    def __init__(self, group: ActorGroup, name: str, calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]],
                 timeout_s: float) -> None:
        self.calls = Calls(group, name, timeout_s)
        for rank, (args, kwargs) in calls.items():
            self.calls.send(rank, rank, *args, **kwargs)
        self.ranks = sorted(calls)
        self._results: dict[int, Any] = {}

    def get(self) -> list[Any]:
        while len(self.calls):
            key, _, result = self.calls.next()
            self._results[key] = result
        return [self._results[rank] for rank in self.ranks]

    def done(self) -> bool:
        """Whether every rank has answered (a result or an error); does not wait."""
        refs = self.calls.refs()
        return len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs)


def wait_any(pendings: Sequence[Pending], timeout_s: float) -> list[int]:
    """Indices of the ``pendings`` whose every rank has answered, waiting up to ``timeout_s`` for at
    least one (an empty list after the wait: their ``get()`` raises the deadline error)."""
    deadline = Deadline(timeout_s)
    while True:
        done = [i for i, p in enumerate(pendings) if p.done()]
        if done or not deadline.left():
            return done
        refs = [ref for p in pendings for ref in p.calls.refs()]
        answered = len(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
        if answered < len(refs):  # else one finished since the check above
            ray.wait(refs, num_returns=answered + 1, timeout=deadline.left())  # until one more rank answers


class ActorGroup:
    """N ranks of one role class. ``cls(rank, world_size, *args, **kwargs)`` builds each rank.

    Every call waits at most ``policy.call_timeout_s`` (``setup`` calls ``policy.setup_timeout_s``).
    A dead rank goes to the ``supervisor``: a rank of a replaceable class is replaced in its bundle
    (its setup calls replayed, then the supervisor's ``after_replace`` hooks) and the lost call runs
    again on it; any other raises ``RankLost`` for the stage to roll back.
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
        supervisor: Supervisor | None = None,
        policy: FaultPolicy | None = None,
        faults: FaultLog | None = None,
        **kwargs: Any,
    ) -> None:
        """Without ``placement`` the group reserves (and on shutdown frees) its own placement group of
        one bundle per rank; with it, rank i runs in bundle i of that shared group. Without a
        ``supervisor`` the group has one of its own (with ``policy`` and ``faults``)."""
        self.role = role
        self.cls = cls
        self.num_workers = num_workers
        self.resources = resources
        self.supervisor = supervisor or Supervisor(policy, faults)
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

    @property
    def policy(self) -> FaultPolicy:
        return self.supervisor.policy

    @property
    def faults(self) -> FaultLog:
        return self.supervisor.events

    @property
    def on_replace(self) -> list[AfterReplace]:
        """What a replaced rank needs after its setup replay (the supervisor's hooks for this group)."""
        return self.supervisor.after_replace(self)

    def _create(self, rank: int) -> Any:
        return self._remote_cls.options(
            num_cpus=self.resources.num_cpus,
            num_gpus=self.resources.num_gpus,
            name=None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._placement, placement_group_bundle_index=rank),
            runtime_env=self._runtime_env,
        ).remote(rank, self.num_workers, *self._init_args, **self._init_kwargs)

    # ------------------------------------------------------------ deadlines and replacement

    def timeout_error(self, name: str, ranks: list[int], timeout_s: float) -> FaultError:
        return FaultError(f"{self.role} rank(s) {ranks}: {name} did not return within {timeout_s:g}s"
                          f"{describe_where(where())} (fault_tolerance.call_timeout_s)")

    def node_of(self, rank: int) -> str:
        """The (short) id of the node rank ``rank``'s bundle was placed on ("?" when unknown)."""
        try:
            return bundle_nodes(self._placement).get(rank, "?")
        except Exception:  # noqa: BLE001 (the table is only for messages)
            return "?"

    def recover(self, rank: int, exc: RayActorError, actor: Any) -> None:
        """After a call to ``actor`` (rank ``rank``) failed: nothing when that actor was already replaced
        (the error is an older call's); a short wait when Ray reports it unavailable for now (its node
        is unreachable: it is retried, and reported dead if the node is lost); else the supervisor's."""
        if actor is not self.actors[rank]:
            return
        if isinstance(exc, ActorUnavailableError):
            time.sleep(1.0)
            return
        self.supervisor.rank_died(self, rank, exc)

    def respawn(self, rank: int) -> None:
        """Kill ``rank`` for good and create it again in its bundle, once the bundle is placed on a live node."""
        position = where()
        ray.kill(self.actors[rank], no_restart=True)
        self._wait_for_bundle(rank, position)
        self.actors[rank] = self._create(rank)

    def replay_setup(self, rank: int) -> None:
        """Run the group's setup calls, in order, on a new ``rank``."""
        for name, args, kwargs in self._setup_calls:
            Pending(self, name, {rank: (args, kwargs)}, self.policy.setup_timeout_s).get()

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
        return self.on_ranks(range(self.num_workers), method, *args, **kwargs)

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
        held run again on it once it is replaced; no item waits past the call deadline.
        ``on_result(index, result)`` is called as each item's result arrives (in arrival order).
        """
        calls = Calls(self, self._method_name(method), self.policy.call_timeout_s, rolling=True)
        results: list[Any] = [None] * len(items)
        free = [rank for rank in range(self.num_workers) for _ in range(in_flight_per_worker)]
        queue = list(range(len(items)))
        while queue or len(calls):
            while free and queue:
                index = queue.pop(0)
                calls.send(index, free.pop(0), items[index], *args, **kwargs)
            index, rank, results[index] = calls.next()
            free.append(rank)
            if on_result is not None:
                on_result(index, results[index])
        return results

    def get(self, refs: list[Any]) -> list[Any]:
        """Wait for refs this group's ``broadcast_refs`` returned, within the call deadline."""
        try:
            return ray.get(refs, timeout=self.policy.call_timeout_s)
        except GetTimeoutError:
            raise self.timeout_error("a call", list(range(self.num_workers)), self.policy.call_timeout_s) from None

    def broadcast_refs(self, method: Callable[..., Any], num_returns: int, *args: Any, **kwargs: Any
                       ) -> list[list[Any]]:
        """Like ``broadcast`` but leave the results in the object store: per rank, ``num_returns`` refs.

        Passing such a ref as a top-level argument to another group's method moves the object
        between actors without the driver ever holding it (how weights travel to rollout workers).
        """
        name = self._method_name(method)
        CALLS.add(self.role, len(self.actors))
        refs = [getattr(a, name).options(num_returns=num_returns).remote(*args, **kwargs) for a in self.actors]
        return [r if isinstance(r, list) else [r] for r in refs]

    def rebuild(self) -> None:
        """Replace every rank in its bundle (the ranks of a trainer group share a process group that
        dies with any of them); the supervisor sets the new ranks up."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = [self._create(i) for i in range(self.num_workers)]
        self._setup_calls.clear()

    def shutdown(self) -> None:
        """Kill the actors and free their placement group (idempotent)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
