"""The shipped on-policy DPO stage learns (make test-all): from the shipped SFT model (the session's
shared run, ``shipped_online_start``) it raises the sampled reward. What one on-policy stage must
record (metrics, the version each iteration sampled, the pairs with their auxiliary scores) is
checked on the uninterrupted run of ``test_fault_recovery.py`` in the default suite."""

from pathlib import Path

import pytest

from orchestrator.config import validate_pipeline
from orchestrator.runner import run_pipeline
from tests.e2e.conftest import shipped_online_stage

ROOT = Path(__file__).resolve().parents[2]
# Measured with the shipped config (first 3 -> last 5 iterations): 0.404 -> 0.613, 0.423 -> 0.613,
# 0.441 -> 0.617 for seeds 0, 1, 2; the test runs seed 0.
REWARD_GAIN = 0.05


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


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
