"""The shipped offline DPO pipeline end to end on real Ray, DeepSpeed, transformers, pyarrow and MLflow.
(Two data-parallel ranks, the MLflow lineage and the checkpoint reload are checked on an offline-DPO
stage in tests/e2e/test_upo_pipeline.py.)"""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import load_pipeline
from orchestrator.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipelines" / "offline_dpo.yaml"
REQUIRED_METRICS = [
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
    "logps/rejected", "grad_norm", "lr", "throughput/pairs_per_s", "throughput/tokens_per_s",
    "eval/rewards/accuracies", "eval/ranking_accuracy",
]


def _run(tmp_path, *overrides):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = load_pipeline(PIPELINE, [f"tracking.uri={uri}", f"run_dir={tmp_path}/runs", *overrides])
    return run_pipeline(config, quiet=True), MlflowClient(uri)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.mark.parametrize("steps, target", [
    # the shipped config cut to 1000 steps (measured 0.81 at step 500, 0.85 at 1000); make test-all since
    # 2026-12-01 (the default suite's budget): there offline DPO's held-out ranking is asserted by
    # test_real_formats.py and test_upo_pipeline.py
    pytest.param(1000, 0.8, id="1000_steps", marks=pytest.mark.slow),
    # the shipped length (make test-all): must-show 2 of the offline-DPO issue, 0.97 when measured
    pytest.param(None, 0.9, id="shipped", marks=pytest.mark.slow),
])
def test_shipped_pipeline_converges(ray_local, tmp_path, steps, target):
    """Held-out implicit-reward accuracy from 0 at step 0 to the target at the end."""
    result, _ = _run(tmp_path, *([f"stages.offline_dpo.schedule.steps={steps}"] if steps else []))
    dpo = result.stages[1]
    start, end = dpo.first_last("eval/rewards/accuracies")
    assert start == 0.0
    assert end >= target, dpo.metrics["eval/rewards/accuracies"]
    assert len(dpo.metrics["eval/ranking_accuracy"]) >= 2
    assert set(REQUIRED_METRICS) <= set(dpo.metrics), set(REQUIRED_METRICS) - set(dpo.metrics)
