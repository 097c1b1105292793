"""Placement groups: the ones of a stage's plan (``StagePlacement``, reserved when their first role
starts)."""

from __future__ import annotations

import uuid

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from orchestrator.runtime.placement import BundleGroup, StagePlan, pinned_to
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
