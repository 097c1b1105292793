"""The resource plan: derived batch numbers and actor bundles per stage, computed once and logged."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator.config import PipelineConfig
from orchestrator.stage_config import OfflineDPOStage


@dataclass(frozen=True)
class RolePlan:
    """One actor group: how many ranks and what each needs."""

    role: str
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float


@dataclass(frozen=True)
class StagePlan:
    """Derived numbers of one stage (units in the names) and its actor groups, in start order."""

    name: str
    kind: str
    numbers: dict[str, float] = field(default_factory=dict)
    roles: tuple[RolePlan, ...] = ()

    def peak_cpus(self) -> float:
        """Groups of a stage run one after another here, so the peak is the largest group."""
        return max((r.num_workers * r.cpus_per_worker for r in self.roles), default=0.0)

    def as_params(self) -> dict[str, Any]:
        params = {f"plan.{k}": v for k, v in self.numbers.items()}
        for r in self.roles:
            params[f"plan.roles.{r.role}"] = f"{r.num_workers}x(cpu={r.cpus_per_worker},gpu={r.gpus_per_worker})"
        return params


def plan_stage(stage: Any) -> StagePlan:
    if isinstance(stage, OfflineDPOStage):
        s, t, rg = stage.schedule, stage.trainer, stage.reference_group
        pairs_per_worker = s.pairs_per_step // t.num_workers
        return StagePlan(
            stage.name, stage.kind,
            numbers={
                "data_parallel_workers": t.num_workers,
                "pairs_per_step": s.pairs_per_step,
                "pairs_per_worker_per_step": pairs_per_worker,
                "pairs_per_microbatch": s.pairs_per_microbatch,
                "gradient_accumulation_steps": pairs_per_worker // s.pairs_per_microbatch,
                "sequences_per_microbatch": 2 * s.pairs_per_microbatch,
                "total_steps": s.steps,
                "total_pairs": s.steps * s.pairs_per_step,
                "zero_stage": t.zero_stage,
            },
            roles=(
                RolePlan("reference", rg.num_workers, rg.cpus_per_worker, rg.gpus_per_worker),
                RolePlan("policy_trainer", t.num_workers, t.cpus_per_worker, t.gpus_per_worker),
            ),
        )
    return StagePlan(stage.name, stage.kind)  # driver-only stages start no actors


def plan_pipeline(config: PipelineConfig) -> list[StagePlan]:
    return [plan_stage(s) for s in config.stages]


def format_plan(plans: list[StagePlan]) -> str:
    lines = []
    for i, p in enumerate(plans):
        lines.append(f"[{i}] {p.name} ({p.kind})")
        for r in p.roles:
            lines.append(f"      {r.role}: {r.num_workers} x {{CPU: {r.cpus_per_worker}, GPU: {r.gpus_per_worker}}}")
        for k, v in p.numbers.items():
            lines.append(f"      {k} = {v}")
    return "\n".join(lines)


def plan_dict(plans: list[StagePlan]) -> list[dict[str, Any]]:
    return [asdict(p) for p in plans]
