"""The one tracking interface; MLflow is its backend. Only the driver writes to MLflow.

Layout: experiment = pipeline name; one parent run per ``rlhf run``; one child run per stage
(run name = stage name, tag ``mlflow.parentRunId`` = the parent's id).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# The experiment's kind as MLflow 3 records it (model training). MLflow 3.17's UI still opens an
# experiment on its GenAI overview unless the URL says otherwise: see runs_page.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
_PARAM_BATCH = 100  # MLflow accepts at most 100 params per batch call
_METRIC_BATCH = 1000  # and at most 1000 metrics
_PARAM_MAX_LEN = 6000


TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def restore_env(key: str, value: str | None) -> None:
    """Put an environment variable back as it was (``None``: it was unset)."""
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def resolve_tracking_uri(configured: str | None) -> str:
    """$MLFLOW_TRACKING_URI, else the pipeline's ``tracking.uri``, else a local SQLite file."""
    return os.environ.get(TRACKING_URI_ENV) or configured or DEFAULT_TRACKING_URI


class Tracker:
    """Parent/child MLflow runs for one pipeline run."""

    def __init__(self, uri: str, experiment: str, *, system_metrics: bool = True) -> None:
        import logging

        import mlflow

        # MLflow's INFO lines (system-metrics start/stop, table creation) drown the progress bars.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self._mlflow = mlflow
        self.uri = uri
        self.system_metrics = system_metrics
        # mlflow.set_tracking_uri also exports $MLFLOW_TRACKING_URI, which resolve_tracking_uri ranks
        # above a pipeline's tracking.uri: end_pipeline puts back what the caller had, or a second
        # pipeline run in this process would track into this one's store.
        self._caller_env_uri = os.environ.get(TRACKING_URI_ENV)
        mlflow.set_tracking_uri(uri)
        found = mlflow.set_experiment(experiment)
        self.experiment_id = found.experiment_id
        if EXPERIMENT_KIND_TAG not in found.tags:  # a user's own choice of kind stays
            mlflow.MlflowClient(uri).set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self.parent_run_id: str | None = None
        self.active_run_id: str | None = None

    def start_pipeline(self, run_name: str, tags: dict[str, str], run_id: str | None = None) -> str:
        """Start the parent run, or reopen ``run_id`` (a resumed pipeline run)."""
        if run_id is not None:
            self._check_reopenable(run_id, parent=None)
            run = self._mlflow.start_run(run_id=run_id, log_system_metrics=self.system_metrics)
            self._mlflow.set_tags(tags)
        else:
            run = self._mlflow.start_run(run_name=run_name, tags=tags, log_system_metrics=self.system_metrics)
        self.parent_run_id = self.active_run_id = run.info.run_id
        return run.info.run_id

    def _check_reopenable(self, run_id: str, parent: str | None) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        from pipelines.errors import UserError

        try:
            run = MlflowClient(self.uri).get_run(run_id)
        except MlflowException:
            raise UserError(f"cannot resume: MLflow run {run_id} is not in the tracking store {self.uri} "
                            "(resume with the store the run started with)") from None
        if run.info.lifecycle_stage != "active" or (parent and run.data.tags.get("mlflow.parentRunId") != parent):
            raise UserError(f"cannot resume: MLflow run {run_id} was deleted or belongs to another pipeline run")

    def delete_run(self, run_id: str) -> None:
        """Mark a run deleted (a stage rerun from scratch after its config changed)."""
        from mlflow.tracking import MlflowClient

        MlflowClient(self.uri).delete_run(run_id)

    def logged_params(self) -> dict[str, str]:
        from mlflow.tracking import MlflowClient

        assert self.active_run_id is not None
        return dict(MlflowClient(self.uri).get_run(self.active_run_id).data.params)

    def metric_history(self, run_id: str) -> dict[str, list[tuple[int, float]]]:
        """Every metric of a run as (step, value) in step order (for stages finished earlier)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        names = client.get_run(run_id).data.metrics
        return {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name)) for name in names}

    def end_pipeline(self, status: str = "FINISHED") -> None:
        self.flush()
        self._mlflow.end_run(status=status)
        self.active_run_id = None
        restore_env(TRACKING_URI_ENV, self._caller_env_uri)

    @contextmanager
    def stage(self, name: str, tags: dict[str, str] | None = None, run_id: str | None = None) -> Iterator[str]:
        """A child run of the pipeline run (or ``run_id`` reopened); FAILED if the body raises."""
        assert self.parent_run_id is not None, "start_pipeline() first"
        if run_id is not None:
            self._check_reopenable(run_id, parent=self.parent_run_id)
            run = self._mlflow.start_run(run_id=run_id, nested=True, log_system_metrics=self.system_metrics)
        else:
            run = self._mlflow.start_run(
                run_name=name, nested=True, tags=tags or {}, log_system_metrics=self.system_metrics
            )
        self.active_run_id = run.info.run_id
        status = "FAILED"
        try:
            yield run.info.run_id
            status = "FINISHED"
        except (KeyboardInterrupt, SystemExit):
            status = "KILLED"
            raise
        finally:
            self.flush()
            self._mlflow.end_run(status=status)
            self.active_run_id = self.parent_run_id

    def log_params(self, params: dict[str, Any]) -> None:
        items = [(k, str(v)[:_PARAM_MAX_LEN]) for k, v in params.items()]
        for i in range(0, len(items), _PARAM_BATCH):
            self._mlflow.log_params(dict(items[i : i + _PARAM_BATCH]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queued and written by MLflow's background logger, so a training step never waits on the
        store (~9 ms a step with SQLite, measured); ``flush()`` makes them durable."""
        finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if finite:
            self._mlflow.log_metrics(finite, step=step, synchronous=False)

    def log_stage_summary(self, stage: str, history: dict[str, list[tuple[int, float]]], step: int) -> None:
        """A finished stage's headline results on the parent run, as ``<stage>/<metric>`` (its last
        value), so that the compare and chart views of two pipeline runs line up at the top level.
        ``step`` is the stage's index in the pipeline."""
        assert self.parent_run_id is not None, "start_pipeline() first"
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000)
        metrics = [Metric(f"{stage}/{name}", series[-1][1], now, step)
                   for name, series in sorted(summary_metrics(history).items())]
        for i in range(0, len(metrics), _METRIC_BATCH):
            MlflowClient(self.uri).log_batch(self.parent_run_id, metrics=metrics[i : i + _METRIC_BATCH])

    def flush(self) -> None:
        self._mlflow.flush_async_logging()

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifacts(str(directory), artifact_path=artifact_path)

    def log_table(self, data: dict[str, list[Any]], artifact_file: str) -> None:
        """A small table (column → values) as a run artifact that the MLflow UI renders."""
        self._mlflow.log_table(data=data, artifact_file=artifact_file)


def summary_metrics(history: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """The series a stage's summary on the parent run carries: its held-out (``eval/``) metrics, and
    its training loss where it has no held-out loss."""
    keep = {name: series for name, series in history.items()
            if series and name.startswith("eval/") and math.isfinite(series[-1][1])}
    if "eval/loss" not in keep and history.get("loss") and math.isfinite(history["loss"][-1][1]):
        keep["loss"] = history["loss"]
    return keep


def create_parent_run(uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> tuple[str, str]:
    """Create a pipeline's parent run ahead of its driver (``rlhf submit``): the job adopts it, so
    the submitter can print and record its id. Returns (experiment id, run id)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    return experiment_id, run.info.run_id


def find_parent_run(uri: str, experiment: str, run_name: str) -> tuple[str, str] | None:
    """(experiment id, run id) of the parent run named ``run_name`` (a pipeline run id), if any."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`mlflow.runName` = '{run_name}'",
                              max_results=1)
    return (found.experiment_id, runs[0].info.run_id) if runs else None


def close_if_running(uri: str, run_id: str, status: str) -> bool:
    """Mark ``run_id`` ``status`` if it is still RUNNING; True if it was. Best effort: an unreachable
    store (one only the cluster resolves) is skipped after one short try, never retried for minutes."""
    from mlflow.tracking import MlflowClient

    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        client = MlflowClient(uri)
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        client.set_terminated(run_id, status=status)
        return True
    except Exception:  # noqa: BLE001 (a status command must not fail on bookkeeping)
        return False
    finally:
        for key, value in saved.items():
            restore_env(key, value)


def runs_page(server: str, experiment_id: str) -> str:
    """The MLflow UI's page of an experiment's runs. MLflow 3's UI opens an experiment on its GenAI
    overview (traces) unless told the workflow is model training: a UI setting, kept in the browser,
    that the experiment's kind tag does not change (seen in a browser on MLflow 3.17)."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
