"""The driver loop: start Ray and MLflow, run stages in order, record outputs and lineage."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import PipelineConfig, dump_pipeline, flatten_for_params
from orchestrator.console import RunConsole
from orchestrator.lineage import (
    MODEL_KINDS,
    log_datasets,
    register_model,
    registered_name,
    stage_datasets,
    stage_numbers,
    tag_evaluated_versions,
)
from orchestrator.plan import plan_pipeline
from orchestrator.progress import StageProgress
from orchestrator.run_state import (
    STATE_FILE,
    RunState,
    StageRecord,
    find_run_dir,
    outputs_exist,
    stage_hashes,
)
from orchestrator.runtime.actor_group import GroupPool, StagePlacement
from orchestrator.runtime.context import StageContext
from orchestrator.runtime.faults import FaultError, FaultPolicy
from orchestrator.runtime.placement import StagePlan, check_plan, format_plan_brief, placeable
from orchestrator.runtime.tracking import Tracker, resolve_tracking_uri
from pipelines.data import hub_revision
from pipelines.errors import UserError
from pipelines.stages.config import FaultToleranceConfig
from pipelines.stages.registry import KINDS, preflight_inputs


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
    experiment_id: str = ""


def new_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def init_ray(config: PipelineConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")  # set for a Ray job's driver
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=config.ray.num_cpus, include_dashboard=config.ray.include_dashboard, log_to_driver=True)


def check_capacity(plans: list[StagePlan]) -> None:
    """Fail before any actor starts when some stage cannot be placed on the cluster's nodes."""
    import ray

    nodes = [placeable(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    check_plan(plans, nodes, available=placeable(ray.available_resources()))


def run_pipeline(config: PipelineConfig, *, quiet: bool = False, resume: str | None = None,
                 run_id: str | None = None, mlflow_run_id: str | None = None,
                 verbose: bool = False) -> PipelineResult:
    """Run every stage of ``config`` in dependency order as one MLflow parent run with a child run per stage.

    Args:
        resume: None starts a new run. A run id (or "" for this pipeline's latest run) continues that
            run: stages completed with an unchanged config (and unchanged upstream) are skipped and their
            outputs reused; an interrupted stage continues from its last in-stage checkpoint in its
            MLflow child run; a stage whose config changed runs again from scratch, its old child run
            deleted. The parent run is reopened, never duplicated.
        run_id: the id of a new run (default: a timestamp and a random suffix); ``rlhf submit``
            chooses it so that the Ray submission id derives from it.
        mlflow_run_id: an existing, empty MLflow run to adopt as the parent run (created by
            ``rlhf submit`` before the job starts).
        verbose: show the actors' and libraries' output on the console too; by default it goes only
            to each stage's ``stage.log`` (``orchestrator.console``).
    """
    for stage in config.stages:
        preflight_inputs(stage)  # bad inputs fail before a run directory, Ray or MLflow exist
    hashes = stage_hashes(config)
    state: RunState | None = None
    if resume is None:
        run_id = run_id or new_run_id()
        run_dir = Path(config.run_dir) / config.name / run_id
        if (run_dir / STATE_FILE).exists():
            raise UserError(f"run {run_id} already exists in {run_dir}; continue it with --resume {run_id}")
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = find_run_dir(config, resume or None)
        state = RunState.load(run_dir)
        run_id = state.run_id
    resolved = run_dir / "pipeline.resolved.yaml"
    resolved.write_text(dump_pipeline(config))
    plans = plan_pipeline(config)
    if not quiet:
        print(f"run {run_id}  ->  {run_dir}{'  (resumed)' if state else ''}\n{format_plan_brief(plans)}\n"
              "(`rlhf plan` prints the whole plan, batch numbers included; each stage logs it as plan.* params)")

    uri = resolve_tracking_uri(config.tracking.uri)
    if state is not None and state.tracking_uri != uri:
        raise UserError(f"cannot resume run {run_id}: it tracks to {state.tracking_uri}, this call to {uri} "
                        "(set MLFLOW_TRACKING_URI / tracking.uri as when the run started)")
    import ray  # noqa: F401  (its import installs the console handler of Ray's logger that attach() takes off)

    console = RunConsole(run_dir / "pipeline.log", verbose=verbose)
    console.attach()  # before Ray starts: its start-up lines go to pipeline.log too
    try:
        init_ray(config)
        console.attach_workers()
        check_capacity(plans)
    except BaseException:
        console.detach()
        raise
    tracker = Tracker(uri, config.tracking.experiment or config.name, system_metrics=config.tracking.system_metrics)
    parent = tracker.start_pipeline(run_id, tags={"rlhf.pipeline": config.name, "rlhf.run_dir": str(run_dir)},
                                    run_id=state.mlflow_parent_run_id if state else mlflow_run_id)
    if state is None:
        state = RunState(run_id, config.name, parent, uri)
    else:
        state.attempts += 1
    state.save(run_dir)
    results: list[StageResult] = []
    status = "FAILED"
    pool = GroupPool()
    try:
        _log_pipeline_params(tracker, config, state.attempts)
        tracker.log_artifact(resolved)
        outputs: dict[str, dict[str, str]] = {}
        for index, (stage, plan) in enumerate(zip(config.stages, plans)):
            record = state.stages.get(stage.name)
            if (record and record.status == "completed" and record.config_hash == hashes[stage.name]
                    and outputs_exist(record.outputs)):
                pool.release_all()
                if not quiet:
                    print(f"{stage.name}: completed earlier with this config; outputs reused")
                result = StageResult(stage.name, stage.kind, record.mlflow_run_id, record.outputs,
                                     tracker.metric_history(record.mlflow_run_id))
            else:
                reopen = None
                if (record and record.status == "running" and record.config_hash == hashes[stage.name]
                        and stage.checkpoint_interval()):
                    reopen = record.mlflow_run_id  # continue it from its last in-stage checkpoint
                elif record:  # changed config or upstream, or nothing to continue from: start it over
                    tracker.delete_run(record.mlflow_run_id)
                result = _run_stage(config, stage, plan, index, tracker, run_dir, outputs, quiet,
                                    console=console, state=state, config_hash=hashes[stage.name], reopen=reopen, pool=pool,
                                    next_plan=plans[index + 1] if index + 1 < len(plans) else None)
            tracker.log_stage_summary(stage.name, result.metrics, step=index)
            if stage.kind == "evaluate" and config.tracking.registers and "comparison" in result.outputs:
                comparison = json.loads(Path(result.outputs["comparison"]).read_text())
                tag_evaluated_versions(uri, stage.name, stage.policies, comparison,
                                       {r.name: r.run_id for r in results})
            outputs[stage.name] = result.outputs
            results.append(result)
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (`rlhf stop`; Ray's handler exits)
        status = "KILLED"
        raise
    finally:
        pool.release_all()
        tracker.end_pipeline(status)
        console.detach()
    return PipelineResult(run_id, parent, run_dir, uri, results, tracker.experiment_id)


def model_revisions(stage: Any) -> dict[str, str]:
    """``rlhf.model.<field>.revision``: the commit each hub-id model input of ``stage`` resolves to
    (local paths and other stages' outputs have none)."""
    tags = {}
    for field_path, (kind, _) in stage.inputs().items():
        value = stage.field(field_path)
        if kind in ("model", "reward_model") and isinstance(value, str):
            revision = hub_revision(value)
            if revision:
                tags[f"rlhf.model.{field_path}.revision"] = revision
    return tags


def fault_policy(ft: FaultToleranceConfig) -> FaultPolicy:
    return FaultPolicy(ft.max_restarts, ft.call_timeout_s, ft.setup_timeout_s)


def _log_pipeline_params(tracker: Tracker, config: PipelineConfig, attempt: int) -> None:
    """The resolved config as parent-run params. MLflow params cannot change: on a resume with a
    changed config, new keys are added and the changed ones are listed in a tag."""
    flat = flatten_for_params(config)
    if attempt == 1:
        tracker.log_params(flat)
        return
    logged = tracker.logged_params()
    tracker.log_params({k: v for k, v in flat.items() if k not in logged})
    changed = sorted(k for k, v in flat.items() if k in logged and logged[k] != str(v)[:6000])
    if changed:
        tracker.set_tags({f"rlhf.attempt{attempt}.changed_params": ", ".join(changed)[:5000]})


def _log_stage_log(tracker: Tracker, log: Path) -> None:
    """The stage's log as an artifact of its child run; best effort (a store that cannot take it
    must not hide why the stage ended)."""
    try:
        tracker.log_artifact(log, "logs")
    except Exception as exc:  # noqa: BLE001
        print(f"warning: could not log {log} to MLflow: {exc}", file=sys.stderr)


def _register(config: PipelineConfig, stage: Any, output: str, child: str, state: RunState, config_hash: str,
              history: dict[str, list[tuple[int, float]]], tracker: Tracker, quiet: bool) -> None:
    """A model output, logged under ``checkpoints/<output>`` of the stage's run, as a registry version."""
    reg = config.tracking.registry
    tags = {"rlhf.pipeline": config.name, "rlhf.pipeline_run": state.run_id,
            "rlhf.parent_run_id": state.mlflow_parent_run_id, "rlhf.stage": stage.name,
            "rlhf.stage_kind": stage.kind, "rlhf.config_hash": config_hash, "rlhf.output": output}
    done = register_model(tracker.uri, name=registered_name(reg.name, config.name, stage.name, output),
                          run_id=child, artifact_path=f"checkpoints/{output}", tags=tags,
                          numbers=stage_numbers(history), alias=reg.alias, best_by=reg.best_by)
    tracker.set_tags({f"rlhf.registered.{output}": f"models:/{done.name}/{done.version}"})
    if not quiet:
        moved = f", now @{reg.alias}" if done.alias_moved else ""
        print(f"{stage.name}: registered models:/{done.name}/{done.version}{moved}")


def _log_plots(tracker: Tracker, stage: str, history: dict[str, list[tuple[int, float]]],
               outputs: dict[str, str], directory: Path) -> None:
    """The stage's pictures (``orchestrator.plots``) as artifacts under ``plots/``; best effort."""
    from orchestrator.plots import stage_plots

    try:
        for path in stage_plots(stage, history, outputs, directory):
            tracker.log_artifact(path, "plots")
    except Exception as exc:  # noqa: BLE001 (a picture must not fail a trained stage)
        print(f"warning: {stage}: could not draw or log its plots: {exc}", file=sys.stderr)


def _run_stage(config: PipelineConfig, stage: Any, plan: StagePlan, index: int, tracker: Tracker,
               run_dir: Path, outputs: dict[str, dict[str, str]], quiet: bool, *, console: RunConsole,
               state: RunState, config_hash: str, reopen: str | None, pool: GroupPool,
               next_plan: StagePlan | None) -> StageResult:
    stage_dir = run_dir / "stages" / stage.name
    if reopen is None and stage_dir.exists():
        shutil.rmtree(stage_dir)  # what an earlier config of this stage left (its checkpoint included)
    stage_dir.mkdir(parents=True, exist_ok=True)
    tags = {"rlhf.stage_kind": stage.kind, "rlhf.stage_index": str(index), "rlhf.config_hash": config_hash}
    log_file = stage_dir / "stage.log"
    with tracker.stage(stage.name, tags=tags, run_id=reopen) as child, console.stage(log_file) as log:
        state.stages[stage.name] = StageRecord(config_hash, "running", child)
        state.save(run_dir)
        if reopen is None:
            flat = flatten_for_params(config)
            prefix = f"stages.{stage.name}."
            tracker.log_params({k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)} | plan.as_params())
        tracker.set_tags(model_revisions(stage))
        with StageProgress(stage.name, disabled=quiet) as progress:
            ctx = StageContext(stage, stage_dir, outputs, tracker, seed=config.seed, progress=progress.update,
                               placement=StagePlacement(plan, timeout_s=config.ray.placement_timeout_s),
                               checkpoint_every=stage.checkpoint_interval(), pool=pool, next_plan=next_plan,
                               fault_policy=fault_policy(stage.fault_tolerance or config.fault_tolerance))
            if reopen is None:
                log_datasets(stage_datasets(stage, ctx.input), stage=stage.name,
                             parent_run_id=tracker.parent_run_id)
            succeeded = False
            try:
                stage_outputs = KINDS[stage.kind].run(stage, ctx)
                ctx.commit_metrics()
                succeeded = True
            except FaultError as exc:  # a hang, a spent budget, a lost node: name the stage, keep its checkpoint
                error = FaultError(f"stage {stage.name!r}: {exc}")
                console.stage_failed(stage.name, log, error)
                raise error from exc
            except Exception as exc:
                if isinstance(exc, UserError):  # bad input found while running: its message names it (exit 2)
                    console.stage_stopped(stage.name, log)
                else:
                    console.stage_failed(stage.name, log, exc)
                raise
            finally:
                ctx.close(succeeded)
                _log_stage_log(tracker, log)
        tracker.set_tags({f"output.{name}": path for name, path in stage_outputs.items()})
        _log_plots(tracker, stage.name, ctx.metrics_history, stage_outputs, stage_dir / "plots")
        if ctx.reused:
            tracker.set_tags({"rlhf.reused_groups": ",".join(ctx.reused)})
            if not quiet:
                print(f"{stage.name}: kept alive from the previous stage: {', '.join(ctx.reused)}")
        if config.tracking.log_checkpoints:
            for name, path in stage_outputs.items():
                if stage.OUTPUTS.get(name) in MODEL_KINDS:
                    tracker.log_artifacts(path, artifact_path=f"checkpoints/{name}")
                    if config.tracking.registers and stage.TRAINS:
                        _register(config, stage, name, child, state, config_hash, ctx.metrics_history, tracker,
                                  quiet)
        state.stages[stage.name] = StageRecord(config_hash, "completed", child, stage_outputs)
        state.save(run_dir)
        return StageResult(stage.name, stage.kind, child, stage_outputs, ctx.metrics_history)
