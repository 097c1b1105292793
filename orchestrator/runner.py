"""The driver loop: start Ray and MLflow, run stages in order, record outputs and lineage."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.actor_group import StagePlacement
from orchestrator.config import PipelineConfig, flatten_for_params
from orchestrator.context import StageContext
from orchestrator.plan import RESOURCE_KEYS, StagePlan, check_plan, format_plan, plan_pipeline
from orchestrator.progress import StageProgress
from orchestrator.tracking import Tracker, resolve_tracking_uri
from pipelines.data import preflight_inputs
from pipelines.stages import STAGES


@dataclass
class StageResult:
    name: str
    kind: str
    run_id: str
    outputs: dict[str, str]
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def first_last(self, metric: str) -> tuple[float, float] | None:
        series = self.metrics.get(metric)
        return (series[0][1], series[-1][1]) if series else None


@dataclass
class PipelineResult:
    run_id: str
    mlflow_run_id: str
    run_dir: Path
    tracking_uri: str
    stages: list[StageResult]


def new_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def init_ray(config: PipelineConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if config.ray.address:
        ray.init(address=config.ray.address, log_to_driver=True)
    else:
        ray.init(num_cpus=config.ray.num_cpus, include_dashboard=config.ray.include_dashboard, log_to_driver=True)


def check_capacity(plans: list[StagePlan]) -> None:
    """Fail before any actor starts when some stage cannot be placed on the cluster's nodes."""
    import ray

    nodes = [{k: n["Resources"].get(k, 0.0) for k in RESOURCE_KEYS} for n in ray.nodes() if n.get("Alive")]
    check_plan(plans, nodes, available=ray.available_resources())


def run_pipeline(config: PipelineConfig, *, quiet: bool = False) -> PipelineResult:
    """Run every stage of ``config`` in order as one MLflow parent run with a child run per stage."""
    for stage in config.stages:
        preflight_inputs(stage)  # bad inputs fail before a run directory, Ray or MLflow exist
    run_id = new_run_id()
    run_dir = Path(config.run_dir) / config.name / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "pipeline.resolved.yaml"
    resolved.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False))
    plans = plan_pipeline(config)
    if not quiet:
        print(f"run {run_id}  ->  {run_dir}\n{format_plan(plans)}")

    init_ray(config)
    check_capacity(plans)
    uri = resolve_tracking_uri(config.tracking.uri)
    tracker = Tracker(uri, config.tracking.experiment or config.name, system_metrics=config.tracking.system_metrics)
    parent = tracker.start_pipeline(run_id, tags={"rlhf.pipeline": config.name, "rlhf.run_dir": str(run_dir)})
    results: list[StageResult] = []
    status = "FAILED"
    try:
        tracker.log_params(flatten_for_params(config))
        tracker.log_artifact(resolved)
        outputs: dict[str, dict[str, str]] = {}
        for index, (stage, plan) in enumerate(zip(config.stages, plans)):
            result = _run_stage(config, stage, plan, index, tracker, run_dir, outputs, quiet)
            outputs[stage.name] = result.outputs
            results.append(result)
        status = "FINISHED"
    finally:
        tracker.end_pipeline(status)
    return PipelineResult(run_id, parent, run_dir, uri, results)


def _run_stage(config: PipelineConfig, stage: Any, plan: StagePlan, index: int, tracker: Tracker,
               run_dir: Path, outputs: dict[str, dict[str, str]], quiet: bool) -> StageResult:
    stage_dir = run_dir / "stages" / stage.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    with tracker.stage(stage.name, tags={"rlhf.stage_kind": stage.kind, "rlhf.stage_index": str(index)}) as child:
        flat = flatten_for_params(config)
        prefix = f"stages.{stage.name}."
        tracker.log_params({k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)} | plan.as_params())
        with StageProgress(stage.name, disabled=quiet) as progress:
            ctx = StageContext(stage, stage_dir, outputs, tracker, seed=config.seed, progress=progress.update,
                               placement=StagePlacement(plan, timeout_s=config.ray.placement_timeout_s))
            try:
                stage_outputs = STAGES[stage.kind](stage, ctx)
            finally:
                ctx.close()
        tracker.set_tags({f"output.{name}": path for name, path in stage_outputs.items()})
        if config.tracking.log_checkpoints:
            for name, path in stage_outputs.items():
                if stage.OUTPUTS.get(name) == "model":
                    tracker.log_artifacts(path, artifact_path=f"checkpoints/{name}")
        return StageResult(stage.name, stage.kind, child, stage_outputs, ctx.metrics_history)
