"""The pipeline's plan: one ``StagePlan`` per stage (``orchestrator.runtime.placement``), in run order;
and the CPUs a stage's YAML left unset, fitted to the machine a local run starts Ray on."""

from __future__ import annotations

import math
import os

from orchestrator.config import PipelineConfig
from orchestrator.runtime.placement import StagePlan, plan_stage
from pipelines.stages.base import StageBase, with_default

CPU_STEP = 0.05  # fitted CPUs are multiples of this (Ray accepts fractions down to 1e-4)


def plan_pipeline(config: PipelineConfig) -> list[StagePlan]:
    return [plan_stage(s) for s in config.stages]


def machine_cpus(config: PipelineConfig) -> float | None:
    """The CPUs a local run gives Ray (``ray.num_cpus``, else the CPUs this process may use); None
    when the run joins a cluster (``ray.address`` or ``RAY_ADDRESS``): ``check_plan`` judges that one."""
    if config.ray.address or os.environ.get("RAY_ADDRESS"):
        return None
    return float(config.ray.num_cpus or len(os.sched_getaffinity(0)))


def fit_to_machine(config: PipelineConfig) -> tuple[PipelineConfig, list[str]]:
    """The config with each stage whose phases need more CPUs than the machine has scaled down in
    the roles whose ``cpus_per_worker`` the YAML left unset (what the user set is kept); one line per
    stage changed. A stage that cannot fit even so is left for ``check_plan`` to refuse, naming why."""
    cpus = machine_cpus(config)
    if cpus is None:
        return config, []
    stages, notes = [], []
    for stage in config.stages:
        fitted, note = fit_stage(stage, cpus)
        stages.append(fitted)
        notes += [note] if note else []
    return (config.model_copy(update={"stages": stages}) if notes else config), notes


def fit_stage(stage: StageBase, cpus: float) -> tuple[StageBase, str | None]:
    plan, configs = plan_stage(stage), stage.role_configs()
    unset = {role for role, c in configs.items() if "cpus_per_worker" not in c.model_fields_set}
    factor = 1.0
    for phase in plan.phases:
        held = [plan.role(role) for group in plan.phase_groups(phase) for role in group.roles]
        fixed = sum(r.num_workers * r.cpus_per_worker for r in held if r.role not in unset)
        flexible = sum(r.num_workers * r.cpus_per_worker for r in held if r.role in unset)
        if fixed + flexible > cpus + 1e-9 and flexible > 0 and cpus > fixed:
            factor = min(factor, (cpus - fixed) / flexible)
    if factor >= 1.0:
        return stage, None
    updates, changes = {}, []
    for role in sorted(unset):
        config = configs[role]
        new = round(max(CPU_STEP, math.floor(config.cpus_per_worker * factor / CPU_STEP + 1e-9) * CPU_STEP), 4)
        updates[role] = with_default(config, cpus_per_worker=new)
        changes.append(f"{role} {config.cpus_per_worker:g} -> {new:g}")
    return (stage.with_role_resources(updates),
            f"stage {stage.name!r}: CPUs the YAML left unset, fitted to this machine's {cpus:g}: {', '.join(changes)}")
