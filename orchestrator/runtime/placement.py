"""The resource plan: derived batch numbers, actor groups and placement bundles per stage.

Placement is data. Each role of a stage is ``num_workers`` ranks of ``{CPU, GPU}``; roles in one
colocation set share a placement group whose bundle i holds rank i of each of them. The plan is
computed from the config alone (``plan_stage``), printed, logged to MLflow, and checked against the
cluster's nodes (``check_plan``) before any actor starts.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from pipelines.errors import UserError

RESOURCE_KEYS = ("CPU", "GPU")
# Ray's per-placement-group resources (``CPU_group_<pg id>``, ``node_a_group_0_<pg id>``)
PLACEMENT_GROUP_RESOURCE = re.compile(r"_group_(\d+_)?[0-9a-f]{16,}$")
NODE_SHARE = 0.001  # what a bundle asks of a node's custom resource to land on that node


@dataclass(frozen=True)
class RolePlan:
    """One actor group: how many ranks and what each needs."""

    role: str
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    node: str | None = None  # a node's custom resource (``placement.nodes``): every rank runs there

    def worker_bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker}
        return bundle | ({self.node: NODE_SHARE} if self.node else {})


@dataclass(frozen=True)
class BundleGroup:
    """One placement group: rank i of every role here runs in bundle i."""

    roles: tuple[str, ...]
    bundles: tuple[dict[str, float], ...]
    strategy: str

    def total(self) -> dict[str, float]:
        return _add(*self.bundles)


@dataclass(frozen=True)
class StagePlan:
    """Derived numbers of one stage (units in the names), its actor groups and their bundles."""

    name: str
    kind: str
    numbers: dict[str, float | str] = field(default_factory=dict)
    roles: tuple[RolePlan, ...] = ()
    groups: tuple[BundleGroup, ...] = ()
    phases: tuple[tuple[str, ...], ...] = ()
    inputs: tuple[str, ...] = ()  # "field <- stage.output" for every input read from an earlier stage

    def role(self, name: str) -> RolePlan:
        for r in self.roles:
            if r.role == name:
                return r
        raise KeyError(f"stage {self.name!r} has no role {name!r} in its plan (roles: {[r.role for r in self.roles]})")

    def group_of(self, role: str) -> BundleGroup:
        return next(g for g in self.groups if role in g.roles)

    def phase_groups(self, phase: tuple[str, ...]) -> list[BundleGroup]:
        """The placement groups alive while the roles of ``phase`` run."""
        return [g for g in self.groups if set(g.roles) & set(phase)]

    def peak(self) -> dict[str, float]:
        """The most CPUs/GPUs the stage holds at once (over its phases)."""
        demands = [_add(*(g.total() for g in self.phase_groups(p))) for p in self.phases]
        return {k: max((d[k] for d in demands), default=0.0) for k in RESOURCE_KEYS}

    def as_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {f"plan.{k}": v for k, v in self.numbers.items()}
        for r in self.roles:
            params[f"plan.roles.{r.role}"] = (f"{r.num_workers}x(cpu={r.cpus_per_worker},gpu={r.gpus_per_worker})"
                                              + (f"@{r.node}" if r.node else ""))
        for i, g in enumerate(self.groups):
            params[f"plan.placement.{i}"] = (f"{'+'.join(g.roles)}: {len(g.bundles)}x{format_resources(g.bundles[0])} "
                                             f"{g.strategy}")
        if self.roles:
            params["plan.peak"] = format_resources(self.peak())
        return params


def _add(*resources: dict[str, float]) -> dict[str, float]:
    keys = list(RESOURCE_KEYS) + sorted({k for r in resources for k in r} - set(RESOURCE_KEYS))
    return {k: sum(r.get(k, 0.0) for r in resources) for k in keys}


def placeable(resources: dict[str, float]) -> dict[str, float]:
    """CPUs, GPUs and the custom resources a plan may pin to (not Ray's own memory and node markers)."""
    internal = ("node:", "memory", "object_store_memory", "accelerator_type", "bundle_group_")
    return {k: v for k, v in resources.items()
            if k in RESOURCE_KEYS or not (k.startswith(internal) or PLACEMENT_GROUP_RESOURCE.search(k))}


def pinned_to(resources: dict[str, float]) -> list[str]:
    """The nodes a bundle is pinned to: its custom resources (``placement.nodes``)."""
    return sorted(k for k, v in resources.items() if k not in RESOURCE_KEYS and v)


def format_resources(resources: dict[str, float]) -> str:
    """CPU and GPU, then the node a bundle is pinned to (its custom resource), e.g. ``{CPU: 1, GPU: 0} @node_a``."""
    nodes = pinned_to(resources)
    pinned = f" @{'+'.join(nodes)}" if nodes else ""
    return "{" + ", ".join(f"{k}: {resources.get(k, 0.0):g}" for k in RESOURCE_KEYS) + "}" + pinned


def bundle_groups(roles: tuple[RolePlan, ...], colocate: tuple[tuple[str, ...], ...],
                  strategy: str) -> tuple[BundleGroup, ...]:
    """One placement group per colocation set and one per remaining role, in role order.

    Bundle i of a colocation set holds the sum of the resources of rank i of each member role.
    """
    by_name = {r.role: r for r in roles}
    groups: list[BundleGroup] = []
    placed: set[str] = set()
    for r in roles:
        if r.role in placed:
            continue
        members = next((tuple(s) for s in colocate if r.role in s), (r.role,))
        placed.update(members)
        width = max(by_name[m].num_workers for m in members)
        bundles = tuple(_add(*(by_name[m].worker_bundle() for m in members if by_name[m].num_workers > i))
                        for i in range(width))
        groups.append(BundleGroup(members, bundles, strategy))
    return tuple(groups)


class Placement(Protocol):
    """A stage's ``placement`` settings (``pipelines.stages.base.PlacementConfig``)."""

    strategy: str
    colocate: tuple[tuple[str, ...], ...]
    nodes: dict[str, str]


class PlannedStage(Protocol):
    """What the plan reads of a stage config (``pipelines.stages.base.StageBase``; the stages layer
    sits above this one)."""

    name: str
    kind: str
    placement: Placement

    def role_configs(self) -> dict[str, Any]: ...

    def phases(self) -> tuple[tuple[str, ...], ...]: ...

    def numbers(self) -> dict[str, float | str]: ...

    def edges(self) -> tuple[str, ...]: ...


def plan_stage(stage: PlannedStage) -> StagePlan:
    """The plan of one stage config: its roles and their bundles (from ``role_configs()`` and
    ``placement``), its phases, its derived numbers (``numbers()``) and its graph edges (``edges()``)."""
    roles = tuple(RolePlan(name, c.num_workers, c.cpus_per_worker, c.gpus_per_worker, stage.placement.nodes.get(name))
                  for name, c in stage.role_configs().items())
    groups = bundle_groups(roles, stage.placement.colocate, stage.placement.strategy)
    names = {r.role for r in roles}  # a phase names only the roles this config starts (no critic for GRPO, ...)
    phases = tuple(kept for kept in (tuple(r for r in p if r in names) for p in stage.phases()) if kept)
    return StagePlan(stage.name, stage.kind, stage.numbers(), roles, groups, phases, stage.edges())


def format_plan(plans: list[StagePlan]) -> str:
    lines = []
    for i, p in enumerate(plans):
        lines.append(f"[{i}] {p.name} ({p.kind})")
        if p.inputs:
            lines.append(f"      reads {', '.join(p.inputs)}")
        for r in p.roles:
            lines.append(f"      {r.role}: {r.num_workers} x {{CPU: {r.cpus_per_worker:g}, GPU: {r.gpus_per_worker:g}}}"
                         + (f" on {r.node}" if r.node else ""))
        for g in p.groups:
            shared = " (colocated)" if len(g.roles) > 1 else ""
            lines.append(f"      placement group {'+'.join(g.roles)}{shared}: "
                         f"{' '.join(format_resources(b) for b in g.bundles)} {g.strategy}")
        if p.roles:
            lines.append(f"      peak = {format_resources(p.peak())}")
        for k, v in p.numbers.items():
            lines.append(f"      {k} = {v}")
    return "\n".join(lines)


def format_plan_brief(plans: list[StagePlan]) -> str:
    """One line per stage: its roles (ranks x resources) and peak; ``rlhf plan`` prints the whole plan."""
    lines = []
    for i, p in enumerate(plans):
        roles = ", ".join(f"{r.role} {r.num_workers}x{{CPU: {r.cpus_per_worker:g}, GPU: {r.gpus_per_worker:g}}}"
                          for r in p.roles)
        lines.append(f"[{i}] {p.name} ({p.kind})" + (f": {roles}; peak {format_resources(p.peak())}" if roles else ""))
    return "\n".join(lines)


def plan_dict(plans: list[StagePlan]) -> list[dict[str, Any]]:
    return [asdict(p) for p in plans]


def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(v <= free.get(k, 0.0) + 1e-9 for k, v in need.items())


def _pack(groups: list[BundleGroup], nodes: list[dict[str, float]]) -> str | None:
    """Place every bundle of ``groups`` on ``nodes`` (first fit, largest first); None or why not.

    STRICT_PACK keeps a group on one node and STRICT_SPREAD puts each of its bundles on another
    node; PACK and SPREAD only need each bundle to fit somewhere (as Ray's soft strategies do).
    """
    free = [dict(n) for n in nodes]
    items: list[tuple[BundleGroup, list[dict[str, float]]]] = []
    for g in groups:
        if g.strategy == "STRICT_PACK":
            items.append((g, [g.total()]))
        else:
            items.extend((g, [b]) for b in g.bundles)
    # Bundles pinned to a node (a custom resource) first, then the largest: first fit then leaves the
    # pinned nodes' room to what must go there.
    items.sort(key=lambda item: (not pinned_to(item[1][0]), -item[1][0].get("GPU", 0.0), -item[1][0].get("CPU", 0.0)))
    used: dict[int, set[int]] = {}  # STRICT_SPREAD group -> nodes it already uses
    for g, (need,) in items:
        taken = used.setdefault(id(g), set()) if g.strategy == "STRICT_SPREAD" else set()
        node = next((i for i, f in enumerate(free) if i not in taken and _fits(need, f)), None)
        if node is None:
            return f"no node can hold a {format_resources(need)} bundle of {'+'.join(g.roles)} ({g.strategy})"
        taken.add(node)
        for k, v in need.items():
            free[node][k] = free[node].get(k, 0.0) - v
    return None


def check_plan(plans: list[StagePlan], nodes: list[dict[str, float]], available: dict[str, float] | None = None
               ) -> None:
    """Raise a UserError when some stage phase cannot be placed on ``nodes`` (total resources per node).

    Stages run one after another and release their actors, so each phase is checked against the
    whole cluster; the message lists what the cluster has and what is free now.
    """
    for plan in plans:
        for phase in plan.phases:
            groups = plan.phase_groups(phase)
            why = _pack(groups, nodes)
            if why is None:
                continue
            need = _add(*(g.total() for g in groups))
            have = _add(*nodes)
            free = f"; free now: {format_resources(available)}" if available is not None else ""
            raise UserError(
                f"stage {plan.name!r} cannot be placed: {'+'.join(phase)} need {format_resources(need)} at once "
                f"({why}); the Ray cluster has {len(nodes)} node(s) with {format_resources(have)} in all "
                f"[{', '.join(format_resources(n) for n in nodes)}]{free}"
            )
