"""The tracker in a real MLflow store (SQLite): two pipeline runs in one process each track into
their own store; the caller's $MLFLOW_TRACKING_URI is what it was after a run."""

from __future__ import annotations

import os

from mlflow.tracking import MlflowClient

from orchestrator.runtime.tracking import Tracker, resolve_tracking_uri


def _one_run(configured: str) -> tuple[str, str]:
    uri = resolve_tracking_uri(configured)
    tracker = Tracker(uri, "exp", system_metrics=False)
    run_id = tracker.start_pipeline("run", {})
    tracker.end_pipeline()
    return uri, run_id


def test_a_second_pipeline_run_tracks_into_its_own_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first_store, second_store = (f"sqlite:///{tmp_path}/{name}.db" for name in ("first", "second"))
    assert _one_run(first_store)[0] == first_store
    assert "MLFLOW_TRACKING_URI" not in os.environ  # mlflow.set_tracking_uri exported it during the run
    uri, run_id = _one_run(second_store)
    assert uri == second_store
    assert MlflowClient(second_store).get_run(run_id).info.status == "FINISHED"
    assert not MlflowClient(first_store).search_runs(
        [MlflowClient(first_store).get_experiment_by_name("exp").experiment_id], f"attributes.run_id = '{run_id}'")


def test_the_callers_tracking_uri_wins_and_is_kept(tmp_path, monkeypatch):
    callers = f"sqlite:///{tmp_path}/callers.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", callers)
    uri, run_id = _one_run(f"sqlite:///{tmp_path}/configured.db")
    assert uri == callers and os.environ["MLFLOW_TRACKING_URI"] == callers
    assert MlflowClient(callers).get_run(run_id).info.status == "FINISHED"
