"""The closing lines of ``rlhf run``: where to look at the run in the MLflow UI."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.report import print_summary
from orchestrator.runner import PipelineResult, StageResult


def _closing(uri: str) -> str:
    stage = StageResult("sft", "sft", "c1", {}, {"eval/exact_match": [(0, 0.25), (600, 0.75)]})
    out = io.StringIO()
    print_summary(PipelineResult("20261202-1", "p1", Path("runs/20261202-1"), uri, [stage], "7"),
                  Console(file=out, width=100))
    return out.getvalue()


def test_an_embedded_store_says_how_to_open_it_and_links_the_runs_page():
    text = _closing("sqlite:///runs/mlflow.db")
    assert "mlflow ui --backend-store-uri sqlite:///runs/mlflow.db" in text
    # MLflow 3's UI opens an experiment on its GenAI overview unless the link names the workflow.
    assert "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning" in text


@pytest.mark.parametrize("server", ["http://mlflow.internal:5000", "https://mlflow.example.org/"])
def test_a_tracking_server_gets_a_link_to_the_experiments_runs(server):
    text = _closing(server)
    assert f"{server.rstrip('/')}/#/experiments/7/runs?workflowType=machine_learning" in text
    assert "mlflow ui" not in text


def test_another_store_is_named_with_its_experiment():
    assert "Tracking store: databricks  (experiment id 7)" in _closing("databricks")
