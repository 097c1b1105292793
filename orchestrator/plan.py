"""The resource plan: derived batch numbers and actor bundles per stage, computed once and logged."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator.config import PipelineConfig
from orchestrator.stage_config import OfflineDPOStage, RewardModelStage, SFTStage


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


def _trainer_numbers(unit: str, per_step: int, per_microbatch: int, steps: int, workers: int,
                     zero_stage: int, sequences_per_row: int) -> dict[str, float]:
    per_worker = per_step // workers
    return {
        "data_parallel_workers": workers,
        f"{unit}_per_step": per_step,
        f"{unit}_per_worker_per_step": per_worker,
        f"{unit}_per_microbatch": per_microbatch,
        "gradient_accumulation_steps": per_worker // per_microbatch,
        "sequences_per_microbatch": sequences_per_row * per_microbatch,
        "total_steps": steps,
        f"total_{unit}": steps * per_step,
        "zero_stage": zero_stage,
    }


def _role(role: str, group: Any) -> RolePlan:
    return RolePlan(role, group.num_workers, group.cpus_per_worker, group.gpus_per_worker)


def plan_stage(stage: Any) -> StagePlan:
    if isinstance(stage, SFTStage):
        s, t = stage.schedule, stage.trainer
        numbers = _trainer_numbers("sequences", s.sequences_per_step, s.sequences_per_microbatch, s.steps,
                                   t.num_workers, t.zero_stage, 1)
        return StagePlan(stage.name, stage.kind, numbers, (_role("policy_trainer", t),))
    if isinstance(stage, (OfflineDPOStage, RewardModelStage)):
        s, t = stage.schedule, stage.trainer
        numbers = _trainer_numbers("pairs", s.pairs_per_step, s.pairs_per_microbatch, s.steps,
                                   t.num_workers, t.zero_stage, 2)
        if isinstance(stage, RewardModelStage):
            return StagePlan(stage.name, stage.kind, numbers, (_role("reward_trainer", t),))
        roles = (_role("reference", stage.reference_group), _role("policy_trainer", t))
        return StagePlan(stage.name, stage.kind, numbers, roles)
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
