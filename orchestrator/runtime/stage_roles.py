"""A stage's actor groups: spawned as its plan places them (or taken over from the previous stage's
pool), shut down when it ends, or parked for the next stage when stateless (``GroupPool``)."""

from __future__ import annotations

from typing import Any

from ray.util.placement_group import PlacementGroup, remove_placement_group

from orchestrator.runtime.actor_group import ActorGroup
from orchestrator.runtime.placement import StagePlan
from orchestrator.runtime.placement_groups import StagePlacement
from orchestrator.runtime.recovery import Supervisor, stateless
from orchestrator.runtime.resources import WorkerResources


class StageRoles:
    """The actor groups of one stage, all under its ``supervisor``.

    ``pool`` holds the stateless groups the previous stage kept; ``next_plan`` is the plan of the
    stage after this one (which groups it may keep for it).
    """

    def __init__(self, placement: StagePlacement, supervisor: Supervisor | None = None, *,
                 pool: GroupPool | None = None, next_plan: StagePlan | None = None) -> None:
        self.placement = placement
        self.supervisor = supervisor or Supervisor()
        self.pool = pool
        self.next_plan = next_plan
        self.groups: list[ActorGroup] = []
        self.reused: list[str] = []  # roles taken over from the previous stage
        self._keys: dict[str, tuple[Any, ...]] = {}

    def spawn(self, role: str, cls: type, *args: Any, **kwargs: Any) -> ActorGroup:
        """Start the actor group of ``role`` as the stage's plan places it; shut down when the stage ends
        (or kept for the next stage when the role is stateless and that stage starts the same group).
        A group the previous stage kept with the same class, arguments and resources is taken over."""
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
                group.supervisor.forget(group)
                group.supervisor = self.supervisor
                self.placement.adopt(role, pg)
                self.groups.append(group)
                self.reused.append(role)
                return group
        group = ActorGroup(role, cls, r.num_workers, WorkerResources(r.cpus_per_worker, r.gpus_per_worker), *args,
                           placement=self.placement.acquire(role), placement_timeout_s=self.placement.timeout_s,
                           supervisor=self.supervisor, **kwargs)
        self.groups.append(group)
        return group

    def release(self, group: ActorGroup) -> None:
        """Shut a group down before the stage ends (to free its resources for the next role)."""
        group.shutdown()
        self.groups.remove(group)
        self.placement.release(group.role)

    def close(self, succeeded: bool = False) -> dict[str, str]:
        """Shut the stage's groups down; after a successful stage, park the stateless ones the next
        stage's first phase starts with the same resources in a placement group of their own. Returns
        the node of every bundle it placed, as run tags (``rlhf.placement.<role>[/<role>…]``)."""
        tags = {f"rlhf.placement.{group.replace('+', '/')}": " ".join(nodes)
                for group, nodes in self.placement.nodes.items()}
        if self.pool is not None:
            self.pool.release_all()  # parked for this stage and not claimed
        for group in self.groups:
            pg = None
            if succeeded and self.pool is not None and self._keep_for_next(group):
                pg = self.placement.detach(group.role)
            if pg is not None and self.pool is not None:
                self.pool.park(group, pg, self._keys[group.role])
            else:
                group.shutdown()
        self.groups.clear()
        self.placement.close()
        return tags

    def _keep_for_next(self, group: ActorGroup) -> bool:
        nxt, role = self.next_plan, group.role
        if not stateless(group.cls) or nxt is None or not nxt.phases or role not in nxt.phases[0]:
            return False
        if role not in [r.role for r in nxt.roles]:
            return False
        return nxt.role(role) == self.placement.plan.role(role) and nxt.group_of(role).roles == (role,)


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
