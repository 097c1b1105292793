"""One stage of a pipeline run, in its MLflow child run: its context, its kind's ``run``, and what the
driver records after it (outputs, plots, checkpoints, model versions, the run state). Nothing here
knows a stage kind: what differs per kind comes from the stage's config (``StageBase``)."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.config import PipelineConfig, flatten_for_params
from orchestrator.console import RunConsole
from orchestrator.lineage import (
    MODEL_KINDS,
    log_datasets,
    register_model,
    registered_name,
    stage_datasets,
    stage_numbers,
)
from orchestrator.progress import StageProgress
from orchestrator.run_state import RunState, StageRecord
from orchestrator.runtime.context import StageContext
from orchestrator.runtime.faults import FaultError, FaultPolicy
from orchestrator.runtime.placement import StagePlan
from orchestrator.runtime.stage_roles import GroupPool
from orchestrator.runtime.tracking import Tracker
from pipelines.data.tokens import hub_revision
from pipelines.errors import UserError
from pipelines.stages.base import StageBase, StageRef
from pipelines.stages.registry import KINDS

History = dict[str, list[tuple[int, float]]]


@dataclass
class StageResult:
    name: str
    kind: str
    run_id: str
    outputs: dict[str, str]
    metrics: History = field(default_factory=dict)
    headline: tuple[str, ...] = ()  # the kind's headline metrics, in order (the summary table shows them)

    def first_last(self, metric: str) -> tuple[float, float] | None:
        series = self.metrics.get(metric)
        return (series[0][1], series[-1][1]) if series else None


@dataclass
class Driver:
    """What every stage of one pipeline run shares: its config, state, tracker, console and pool."""

    config: PipelineConfig
    run_dir: Path
    state: RunState
    tracker: Tracker
    console: RunConsole
    pool: GroupPool
    quiet: bool


def resolver(stage: StageBase, outputs: dict[str, dict[str, str]]):  # type: ignore[no-untyped-def]
    """``resolve(field)``: an input field of ``stage`` (``data.train``) → its path: a literal, or the
    output of an earlier stage (``outputs``: stage → output → path)."""

    def resolve(field_path: str) -> str | None:
        value = stage.field(field_path)
        if value is None or isinstance(value, str):
            return value
        assert isinstance(value, StageRef)
        return outputs[value.from_][value.output or stage.inputs()[field_path][1]]

    return resolve


def model_revisions(stage: StageBase) -> dict[str, str]:
    """``rlhf.model.<field>.revision``: the commit each hub-id model input of ``stage`` resolves to
    (local paths and other stages' outputs have none)."""
    tags = {}
    for field_path, (kind, _) in stage.inputs().items():
        value = stage.field(field_path)
        if kind in MODEL_KINDS and isinstance(value, str):
            revision = hub_revision(value)
            if revision:
                tags[f"rlhf.model.{field_path}.revision"] = revision
    return tags


def run_stage(d: Driver, stage: StageBase, plan: StagePlan, index: int, outputs: dict[str, dict[str, str]], *,
              config_hash: str, reopen: str | None, next_plan: StagePlan | None) -> StageResult:
    """Run ``stage`` in a child run (``reopen``: continue that one from its last in-stage checkpoint):
    its params, datasets and model revisions, its kind's ``run`` with a fresh context, then what is
    recorded of it; the run state says ``running`` and then ``completed``."""
    stage_dir = d.run_dir / "stages" / stage.name
    if reopen is None and stage_dir.exists():
        shutil.rmtree(stage_dir)  # what an earlier config of this stage left (its checkpoint included)
    stage_dir.mkdir(parents=True, exist_ok=True)
    tags = {"rlhf.stage_kind": stage.kind, "rlhf.stage_index": str(index), "rlhf.config_hash": config_hash}
    log_file = stage_dir / "stage.log"
    with d.tracker.stage(stage.name, tags=tags, run_id=reopen) as child, d.console.stage(log_file) as log:
        d.state.stages[stage.name] = StageRecord(config_hash, "running", child)
        d.state.save(d.run_dir)
        if reopen is None:
            prefix = f"stages.{stage.name}."
            params = {k[len(prefix):]: v for k, v in flatten_for_params(d.config).items() if k.startswith(prefix)}
            d.tracker.log_params(params | plan.as_params())
        d.tracker.set_tags(model_revisions(stage))
        headline = {m.name: m.label for m in stage.headline()}
        with StageProgress(stage.name, headline, disabled=d.quiet) as progress:
            ft = stage.fault_tolerance or d.config.fault_tolerance
            ctx = StageContext.open(stage_dir, plan, resolve=resolver(stage, outputs), tracker=d.tracker,
                                    policy=FaultPolicy(ft.max_restarts, ft.call_timeout_s, ft.setup_timeout_s),
                                    checkpoint_every=stage.checkpoint_interval(), progress=progress.update,
                                    pool=d.pool, next_plan=next_plan,
                                    placement_timeout_s=d.config.ray.placement_timeout_s, seed=d.config.seed,
                                    name=stage.name)
            if reopen is None:
                log_datasets(stage_datasets(stage, ctx.input), stage=stage.name, parent_run_id=d.tracker.parent_run_id)
            stage_outputs = _run_kind(d, stage, ctx, log)
        _record(d, stage, ctx, stage_outputs, child, config_hash)
        return StageResult(stage.name, stage.kind, child, stage_outputs, ctx.log.history, tuple(headline))


def _run_kind(d: Driver, stage: StageBase, ctx: StageContext, log: Path) -> dict[str, str]:
    """The kind's ``run``; its groups closed after it either way, its log kept as an artifact. A
    failure is reported on the console with the stage's name and log (bad input: exit 2)."""
    succeeded = False
    try:
        outputs = KINDS[stage.kind].run(stage, ctx)
        ctx.log.commit()
        succeeded = True
        return outputs
    except FaultError as exc:  # a hang, a spent budget, a lost node: name the stage, keep its checkpoint
        error = FaultError(f"stage {stage.name!r}: {exc}")
        d.console.stage_failed(stage.name, log, error)
        raise error from exc
    except Exception as exc:
        if isinstance(exc, UserError):  # bad input found while running: its message names it (exit 2)
            d.console.stage_stopped(stage.name, log)
        else:
            d.console.stage_failed(stage.name, log, exc)
        raise
    finally:
        ctx.close(succeeded)
        _best_effort(lambda: d.tracker.log_artifact(log, "logs"), f"could not log {log} to MLflow")


def _record(d: Driver, stage: StageBase, ctx: StageContext, outputs: dict[str, str], child: str,
            config_hash: str) -> None:
    """After a stage: its outputs as tags, its plots, its checkpoints and model versions, the groups it
    kept alive, and ``completed`` in the run state."""
    d.tracker.set_tags({f"output.{name}": path for name, path in outputs.items()})
    _best_effort(lambda: _log_plots(d.tracker, stage, ctx.log.history, outputs, ctx.stage_dir / "plots"),
                 f"{stage.name}: could not draw or log its plots")
    if ctx.roles.reused:
        d.tracker.set_tags({"rlhf.reused_groups": ",".join(ctx.roles.reused)})
        if not d.quiet:
            print(f"{stage.name}: kept alive from the previous stage: {', '.join(ctx.roles.reused)}")
    if d.config.tracking.log_checkpoints:
        for name, path in outputs.items():
            if stage.OUTPUTS.get(name) in MODEL_KINDS:
                d.tracker.log_artifacts(path, artifact_path=f"checkpoints/{name}")
                if d.config.tracking.registers and stage.TRAINS:
                    _register(d, stage, name, child, config_hash, ctx.log.history)
    d.state.stages[stage.name] = StageRecord(config_hash, "completed", child, outputs)
    d.state.save(d.run_dir)


def _register(d: Driver, stage: StageBase, output: str, child: str, config_hash: str, history: History) -> None:
    """A model output, logged under ``checkpoints/<output>`` of the stage's run, as a registry version."""
    reg, state = d.config.tracking.registry, d.state
    tags = {"rlhf.pipeline": d.config.name, "rlhf.pipeline_run": state.run_id,
            "rlhf.parent_run_id": state.mlflow_parent_run_id, "rlhf.stage": stage.name,
            "rlhf.stage_kind": stage.kind, "rlhf.config_hash": config_hash, "rlhf.output": output}
    done = register_model(d.tracker.uri, name=registered_name(reg.name, d.config.name, stage.name, output),
                          run_id=child, artifact_path=f"checkpoints/{output}", tags=tags,
                          numbers=stage_numbers(history), alias=reg.alias, best_by=reg.best_by or stage.ranked_by())
    d.tracker.set_tags({f"rlhf.registered.{output}": f"models:/{done.name}/{done.version}"})
    if not d.quiet:
        moved = f", now @{reg.alias}" if done.alias_moved else ""
        print(f"{stage.name}: registered models:/{done.name}/{done.version}{moved}")


def _log_plots(tracker: Tracker, stage: StageBase, history: History, outputs: dict[str, str], directory: Path) -> None:
    """The stage's pictures (``orchestrator.plots``) as artifacts under ``plots/``."""
    from orchestrator.plots import stage_plots

    for path in stage_plots(stage.name, [m.name for m in stage.headline()], history, outputs, directory):
        tracker.log_artifact(path, "plots")


def _best_effort(write, failure: str) -> None:  # type: ignore[no-untyped-def]
    """Run an MLflow write that must not hide why a stage ended or fail a trained stage (a log, a picture)."""
    try:
        write()
    except Exception as exc:  # noqa: BLE001
        print(f"warning: {failure}: {exc}", file=sys.stderr)
