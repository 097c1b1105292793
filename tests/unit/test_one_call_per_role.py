"""The cheaper online iteration's parts: π_old taken inside the update call (same loss and gradients
as the separate forward), the train–inference gap and stale samples' importance weights computed
there, the driver's call counter, and the long-response task (worked sums) with its reward."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from actors.modeling import load_causal_lm, token_logprobs
from orchestrator.config import load_pipeline
from orchestrator.runtime.calls import CallCounter
from orchestrator.runtime.weight_sync import _probe_batch, _response_rows, probe_token_logps
from pipelines.algorithms.ppo import masked_mean, truncated_is_weights
from pipelines.losses import PolicyGradientLoss
from pipelines.stages.ppo import advantage_batch, policy_loss_of
from pipelines.tasks import worked_sums
from tests.unit.test_ppo_losses import SEQUENCES, _scored

SHIPPED = Path(__file__).resolve().parents[2] / "pipelines" / "ppo.yaml"
GRPO = ["stages.ppo.algorithm.estimator=grpo", "stages.ppo.sampling.samples_per_prompt=2",
        "stages.ppo.schedule.ppo_epochs=1", "stages.ppo.schedule.minibatches_per_epoch=1"]


def _grads(model, loss_fn, batch) -> tuple[float, list[torch.Tensor], dict]:
    model.zero_grad()
    loss, metrics = loss_fn(model, batch)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None], metrics


def test_old_logprobs_in_the_update_match_the_separate_forward(tiny_model_dir):
    """One optimizer step per batch (GRPO, KL in the loss): the batch carries no π_old and the loss
    takes its own detached log-probs, which gives the loss and gradients of the batch built from the
    trainer's separate forward; the engine's log-probs ride along to measure the gap."""
    cfg = load_pipeline(SHIPPED, GRPO).stage("ppo")
    assert cfg.old_logprobs_in_update()
    separate = load_pipeline(SHIPPED, [*GRPO, "stages.ppo.schedule.minibatches_per_epoch=2"]).stage("ppo")
    assert not separate.old_logprobs_in_update()  # two steps: π_old must be fixed before the first
    assert not load_pipeline(SHIPPED).stage("ppo").old_logprobs_in_update()  # the critic's PPO, KL in the reward
    model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        trainer_lp = _response_rows(SEQUENCES, probe_token_logps(model, _probe_batch(SEQUENCES, 0)))
    engine_lp = [[x + 0.01 for x in row] for row in trainer_lp]  # the engine, 0.01 off on every token
    fused, _ = advantage_batch(cfg, _scored(engine_lp), engine_lp, None, kl_coef=0.05, pad_id=0)
    assert fused.old_logps is None and fused.behaviour_logps is not None
    loss_fn = policy_loss_of(cfg, 0.05)
    loss_a, grads_a, metrics = _grads(model, loss_fn, fused)
    assert float(metrics["rollout/logprob_gap"]) == pytest.approx(0.01, abs=1e-5)
    assert float(metrics["rollout/logprob_gap_max"]) == pytest.approx(0.01, abs=1e-5)
    explicit = fused.select(torch.arange(len(fused)))
    with torch.no_grad():
        explicit.old_logps = token_logprobs(model, explicit.input_ids, explicit.attention_mask)
    loss_b, grads_b, _ = _grads(model, loss_fn, explicit)
    assert loss_a == pytest.approx(loss_b, abs=1e-7)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads_a, grads_b, strict=True))


def test_stale_samples_get_their_importance_weights_in_the_update(tiny_model_dir):
    cfg = load_pipeline(SHIPPED, [*GRPO, "stages.ppo.rollout.max_staleness=1"]).stage("ppo")
    loss_fn = policy_loss_of(cfg, 0.05)
    assert loss_fn.is_cap == cfg.algorithm.is_cap == 2.0
    model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        trainer_lp = _response_rows(SEQUENCES, probe_token_logps(model, _probe_batch(SEQUENCES, 0)))
    behaviour = [[x - 0.3 * (i % 3) for i, x in enumerate(row)] for row in trainer_lp]  # an older version's
    batch, _ = advantage_batch(cfg, _scored(behaviour), behaviour, None, kl_coef=0.05, pad_id=0)
    assert batch.is_weights is None  # computed where π_old is: in the loss
    _, _, metrics = _grads(model, loss_fn, batch)
    with torch.no_grad():
        old = token_logprobs(model, batch.input_ids, batch.attention_mask)
    _, want = truncated_is_weights(old, batch.behaviour_logps, batch.action_mask, cap=2.0)
    assert float(metrics["is/weight_mean"]) == pytest.approx(float(want["is/weight_mean"]), abs=1e-6)
    assert float(metrics["is/weight_mean"]) > 1.0  # the behaviour policy gave these tokens less mass
    gap = masked_mean((old - batch.behaviour_logps).abs(), batch.action_mask)
    assert float(metrics["rollout/logprob_gap"]) == pytest.approx(float(gap), abs=1e-6)


def test_a_loss_without_old_logprobs_or_engine_logprobs_still_trains():
    """A batch with neither (no engine log-probs: nothing to compare): ratio 1, no gap metric."""
    loss_fn = PolicyGradientLoss()
    assert loss_fn.proximal(torch.zeros(1, 2), _Batch(), {})[1] is None


class _Batch:
    old_logps = None
    behaviour_logps = None
    action_mask = torch.ones(1, 2)


def test_the_call_counter_counts_per_role_and_starts_again():
    calls = CallCounter()
    calls.add("rollout")
    calls.add("policy_trainer", 2)
    calls.add("rollout")
    assert calls.take() == {"rollout": 2, "policy_trainer": 2}
    assert calls.take() == {}


def test_worked_sums_score_steps_in_order_and_the_total():
    problem = worked_sums.Sum((12, 34, 5, 48))
    assert problem.prompt == "12+34+5+48="
    assert problem.answer == "12+34=46;46+5=51;51+48=99;answer=99"
    assert worked_sums.check(problem.prompt, problem.answer) == 1.0
    assert worked_sums.check(problem.prompt, " " + problem.answer + "\n") == 1.0
    # a slip in step 2: steps 1 and 3 count, step 3 adding to the running sum the answer carried (52)
    assert worked_sums.check(problem.prompt, "12+34=46;46+5=52;52+48=100;answer=99") == pytest.approx(1 / 3 + 0.5)
    # a step that does not start from the carried sum, or adds another term, is wrong
    assert worked_sums.check(problem.prompt, "12+34=46;46+5=52;51+48=99;answer=99") == pytest.approx(0.5 / 3 + 0.5)
    assert worked_sums.check(problem.prompt, "12+34=46;46+6=52;52+48=100;answer=100") == pytest.approx(1 / 3)
    assert worked_sums.check(problem.prompt, "answer=99") == 0.5
    assert worked_sums.check(problem.prompt, "12+34=46;46+5=51") == pytest.approx(0.5 * 2 / 3)
    assert worked_sums.check("12+34=", "46") == 0.0  # no steps written, no "answer="
    # malformed steps (a sampled answer that dropped a number) are wrong, never an error
    assert worked_sums.check("1+5+4=", "1+5=;+4=6;answer=10") == 0.5
    assert worked_sums.check("1+5+4=", "1+5=6;6+=10;+;=;;answer=") == pytest.approx(0.25)
    assert worked_sums.check("not a sum", "answer=1") == 0.0
    assert worked_sums.reward(["1+2+3="], ["1+2=3;3+3=6;answer=6"]) == [1.0]


def test_a_wrong_worked_answer_scores_below_one_and_the_splits_are_disjoint(tmp_path):
    import random

    rng = random.Random(0)
    problems = worked_sums.draw(50, 12, 49, rng)
    assert all(worked_sums.check(p.prompt, worked_sums.wrong_answer(p, rng)) < 1.0 for p in problems)
    lengths = [len(p.answer) for p in problems]
    assert 100 <= sum(lengths) / len(lengths) <= 140  # the "about 10 tokens per term" of the docs
    assert max(len(p.prompt) + len(p.answer) for p in problems) + 1 <= worked_sums.positions_needed(12, 49)
    paths = worked_sums.write_datasets(tmp_path, terms=6, max_operand=49, num_sft=200, num_pairs=50,
                                       num_prompts=100, num_eval=20, seed=3)
    held_out = set(pq.read_table(paths["prompts_eval"]).column("prompt").to_pylist())
    for name in ("sft_train", "pairs_train", "prompts_train"):
        assert not held_out & set(pq.read_table(paths[name]).column("prompt").to_pylist()), name
    sft = pq.read_table(paths["sft_train"]).to_pylist()
    assert all(worked_sums.check(r["prompt"], r["response"]) == 1.0 for r in sft)


def test_the_long_task_is_a_synthetic_task_option_checked_when_the_yaml_loads():
    from orchestrator.config import validate_pipeline
    from pipelines.errors import ConfigError

    def raw(**task):
        return {"name": "t", "stages": [{"name": "task", "kind": "synthetic_task", **task}]}

    stage = validate_pipeline(raw(terms=12, max_operand=49)).stages[0]
    assert stage.built_positions() == worked_sums.positions_needed(12, 49) == 192
    assert validate_pipeline(raw()).stages[0].built_positions() == 128  # the short task keeps the tiny model's
    with pytest.raises(ConfigError, match="verbose_fraction: the worked sums"):
        validate_pipeline(raw(terms=12, verbose_fraction=0.5))
