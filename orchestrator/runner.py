"""The driver loop: start Ray and MLflow, run stages in order (``stage_run.run_stage`` each), record
outputs and lineage. It holds no stage kind's name: what differs per kind is the stage config's."""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import PipelineConfig, dump_pipeline, flatten_for_params
from orchestrator.console import RunConsole
from orchestrator.lineage import RunRegistry
from orchestrator.plan import fit_to_machine, plan_pipeline
from orchestrator.run_state import STATE_FILE, RunState, find_run_dir, outputs_exist, stage_hashes
from orchestrator.runtime.placement import StagePlan, check_plan, format_plan_brief, placeable
from orchestrator.runtime.stage_roles import GroupPool
from orchestrator.runtime.tracking import Tracker, resolve_tracking_uri
from orchestrator.stage_run import Driver, StageResult, run_stage
from pipelines.errors import UserError
from pipelines.stages.preflight import preflight_pipeline

__all__ = ["PipelineResult", "StageResult", "run_pipeline"]


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
    handler = signal.getsignal(signal.SIGTERM)
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=config.ray.num_cpus, include_dashboard=config.ray.include_dashboard, log_to_driver=True)
    if callable(handler) and threading.current_thread() is threading.main_thread():
        # Ray's core worker installs a C-level failure handler for SIGTERM that prints a stack dump and
        # kills the driver: the Python handler `rlhf run` set (unwind like Ctrl-C: runs closed as
        # KILLED, the resume hint) is installed again over it.
        signal.signal(signal.SIGTERM, handler)


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
    preflight_pipeline(config.stages)  # bad inputs fail before a run directory, Ray or MLflow exist
    config, fitted = fit_to_machine(config)
    run_dir, state = _run_dir(config, resume, run_id)
    resolved = run_dir / "pipeline.resolved.yaml"
    resolved.write_text(dump_pipeline(config))
    plans = plan_pipeline(config)
    if not quiet:
        print("".join(f"{note}\n" for note in fitted)
              + f"run {run_dir.name}  ->  {run_dir}{'  (resumed)' if state else ''}\n{format_plan_brief(plans)}\n"
              "(`rlhf plan` prints the whole plan, batch numbers included; each stage logs it as plan.* params)")
    driver = _start(config, run_dir, state, plans, quiet=quiet, verbose=verbose, mlflow_run_id=mlflow_run_id)
    results: list[StageResult] = []
    status = "FAILED"
    try:
        _log_pipeline_params(driver.tracker, config, driver.state.attempts)
        driver.tracker.log_artifact(resolved)
        _run_stages(driver, plans, results)
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (`rlhf stop`; Ray's handler exits)
        status = "KILLED"
        raise
    finally:
        driver.pool.release_all()
        driver.tracker.end_pipeline(status)
        driver.console.detach()
    return PipelineResult(driver.state.run_id, driver.state.mlflow_parent_run_id, run_dir, driver.tracker.uri,
                          results, driver.tracker.experiment_id)


def _run_dir(config: PipelineConfig, resume: str | None, run_id: str | None) -> tuple[Path, RunState | None]:
    """A new run's directory, or with ``resume`` the directory and state of the run to continue."""
    if resume is not None:
        run_dir = find_run_dir(config, resume or None)
        return run_dir, RunState.load(run_dir)
    run_id = run_id or new_run_id()
    run_dir = Path(config.run_dir) / config.name / run_id
    if (run_dir / STATE_FILE).exists():
        raise UserError(f"run {run_id} already exists in {run_dir}; continue it with --resume {run_id}")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, None


def _start(config: PipelineConfig, run_dir: Path, state: RunState | None, plans: list[StagePlan], *, quiet: bool,
           verbose: bool, mlflow_run_id: str | None) -> Driver:
    """Ray up (its capacity checked against the plans), the console attached, the parent run opened."""
    uri = resolve_tracking_uri(config.tracking.uri)
    if state is not None and state.tracking_uri != uri:
        raise UserError(f"cannot resume run {state.run_id}: it tracks to {state.tracking_uri}, this call to {uri} "
                        "(set MLFLOW_TRACKING_URI / tracking.uri as when the run started)")
    import ray  # noqa: F401  (its import installs the console handler of Ray's logger that attach() takes off)

    console = RunConsole(run_dir / "pipeline.log", verbose=verbose)
    console.attach()  # before Ray starts: its start-up lines go to pipeline.log too

    # MLflow's store opens (a new SQLite one migrates its schema for seconds) while Ray starts; the
    # parent run is created only once Ray is up
    with ThreadPoolExecutor(1, thread_name_prefix="tracking-start") as pool:
        tracking = pool.submit(Tracker, uri, config.tracking.experiment or config.name,
                               system_metrics=config.tracking.system_metrics)
        try:
            init_ray(config)
            console.attach_workers()
            check_capacity(plans)
        except BaseException:
            console.detach()
            raise
        tracker = tracking.result()
    parent = tracker.start_pipeline(run_dir.name, tags={"rlhf.pipeline": config.name, "rlhf.run_dir": str(run_dir)},
                                    run_id=state.mlflow_parent_run_id if state else mlflow_run_id)
    if state is None:
        state = RunState(run_dir.name, config.name, parent, uri)
    else:
        state.attempts += 1
    state.save(run_dir)
    return Driver(config, run_dir, state, tracker, console, GroupPool(), quiet)


def _run_stages(d: Driver, plans: list[StagePlan], results: list[StageResult]) -> None:
    """Each stage in order: reused when it completed earlier with this config, else run (continued from
    its in-stage checkpoint when it was interrupted with this config); its summary on the parent run,
    then its ``after_run``."""
    hashes = stage_hashes(d.config)
    outputs: dict[str, dict[str, str]] = {}
    for index, (stage, plan) in enumerate(zip(d.config.stages, plans, strict=True)):
        record = d.state.stages.get(stage.name)
        same = record is not None and record.config_hash == hashes[stage.name]
        if record and same and record.status == "completed" and outputs_exist(record.outputs):
            d.pool.release_all()
            if not d.quiet:
                print(f"{stage.name}: completed earlier with this config; outputs reused")
            history = d.tracker.metric_history(record.mlflow_run_id)
            result = StageResult(stage.name, stage.kind, record.mlflow_run_id, record.outputs, history,
                                 tuple(m.name for m in stage.headline()))
        else:
            reopen = None
            if record and same and record.status == "running" and stage.checkpoint_interval():
                reopen = record.mlflow_run_id  # continue it from its last in-stage checkpoint
            elif record:  # changed config or upstream, or nothing to continue from: start it over
                d.tracker.delete_run(record.mlflow_run_id)
            result = run_stage(d, stage, plan, index, outputs, config_hash=hashes[stage.name], reopen=reopen,
                               next_plan=plans[index + 1] if index + 1 < len(plans) else None)
        d.tracker.log_stage_summary(stage.name, result.metrics, step=index)
        registry = RunRegistry(d.tracker.uri, {r.name: r.run_id for r in results})
        for line in stage.after_run(result.outputs, registry if d.config.tracking.registers else None):
            d.console.note(line, quiet=d.quiet)
        outputs[stage.name] = result.outputs
        results.append(result)


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
