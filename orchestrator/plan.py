"""The pipeline's plan: one ``StagePlan`` per stage (``orchestrator.runtime.placement``), in run order."""

from __future__ import annotations

from orchestrator.config import PipelineConfig
from orchestrator.runtime.placement import StagePlan, plan_stage


def plan_pipeline(config: PipelineConfig) -> list[StagePlan]:
    return [plan_stage(s) for s in config.stages]
