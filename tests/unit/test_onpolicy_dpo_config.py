"""The onpolicy_dpo stage: config checks, its plan, and pair assembly from scored samples."""

import random
from pathlib import Path

import pytest
import yaml

from actors.rollout import RolloutSample
from orchestrator.config import load_pipeline, validate_pipeline
from orchestrator.plan import plan_pipeline
from pipelines.errors import ConfigError, DataError
from pipelines.stages.online import Scored
from pipelines.stages.online_rollout import setups_overlap
from pipelines.stages.onpolicy_dpo import pair_up, sequence_kl, update_steps
from pipelines.stages.registry import preflight_inputs

SHIPPED = Path(__file__).resolve().parents[2] / "pipelines" / "onpolicy_dpo.yaml"


def _raw():
    return yaml.safe_load(SHIPPED.read_text())


def _stage(*overrides):
    return load_pipeline(SHIPPED, list(overrides)).stage("onpolicy_dpo")


def test_shipped_pipeline_plans_three_roles_alive_together():
    """The function reward runs in the rollout workers (no reward role; they take its CPUs), unless
    ``rollout.function_rewards: reward_group`` asks for the role."""
    plan = plan_pipeline(load_pipeline(SHIPPED))[2]
    assert [r.role for r in plan.roles] == ["policy_trainer", "reference", "rollout"]
    assert plan.phases == (("policy_trainer", "reference", "rollout"),)
    assert plan.peak()["CPU"] == 2.0
    grouped = plan_pipeline(load_pipeline(SHIPPED, ["stages.onpolicy_dpo.rollout.function_rewards=reward_group"]))[2]
    assert [r.role for r in grouped.roles] == ["policy_trainer", "reference", "reward", "rollout"]
    assert plan.numbers["samples_per_iteration"] == 128 * 8
    assert plan.numbers["total_steps"] == 60 * 4


@pytest.mark.parametrize("path, value, message", [
    (("selection", "rso_samples"), 9, "selection.rso_samples: 9 accepted of 8 samples per prompt is impossible"),
    (("rollout", "max_model_len"), 16, "rollout.max_model_len: 16 < data.max_prompt_length + max_new_tokens = 22"),
    (("schedule", "pairs_per_microbatch"), 24, "schedule.pairs_per_microbatch: 24 does not divide"),
    (("sampling", "samples_per_prompt"), 1, "samples_per_prompt"),
])
def test_inconsistent_config_names_the_field(path, value, message):
    raw = _raw()
    raw["stages"][2][path[0]][path[1]] = value
    raw["stages"][2]["selection"]["method"] = "rso"
    with pytest.raises(ConfigError) as exc:
        validate_pipeline(raw)
    assert message in str(exc.value)


def test_reward_needs_exactly_one_source_and_a_reward_model_reference_is_typed():
    raw = _raw()
    raw["stages"][2]["reward"] = {}
    with pytest.raises(ConfigError, match="give exactly one of reward.function, reward.model, reward.judge or"):
        validate_pipeline(raw)
    raw["stages"][2]["reward"] = {"model": {"from": "sft"}}  # an SFT model is not a reward model
    with pytest.raises(ConfigError, match="reward.model"):
        validate_pipeline(raw)


def test_preflight_names_a_prompts_file_without_the_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"question": ["1+1="]}), bad)
    stage = _stage(f"stages.onpolicy_dpo.data.train={bad}", "stages.onpolicy_dpo.data.eval=null")
    with pytest.raises(DataError, match=r"prompts.parquet: prompts need field\(s\) \['prompt'\]; missing 'prompt' "
                                        r".*name yours with data.column\)"):
        preflight_inputs(stage)


def _sample(response, logprobs):
    return RolloutSample([1, 5], response, "".join(map(str, response)), logprobs, "stop", 0)


def test_pair_up_selects_per_prompt_and_sums_reference_logprobs():
    cfg = _stage("stages.onpolicy_dpo.sampling.samples_per_prompt=3")
    samples = [_sample([7, 2], [-0.5, -0.1]), _sample([8, 2], [-1.0, -0.1]), _sample([9, 2], [-2.0, -0.2]),
               _sample([7, 2], [-0.5, -0.1]), _sample([7, 2], [-0.5, -0.1]), _sample([7, 2], [-0.5, -0.1])]
    ref = [[-0.4, -0.2], [-1.5, -0.1], [-1.0, -0.3], [-0.4, -0.2], [-0.4, -0.2], [-0.4, -0.2]]
    scored = Scored(["1+1="] * 3 + ["2+2="] * 3, samples, [0.0, 1.0, 0.0, 1.0, 1.0, 1.0], ref)
    pair_set, rows, metrics = pair_up(cfg, scored, ref, random.Random(0))
    # prompt 1: best = sample 1, worst = sample 0 (first of the lowest); prompt 2 all tie: dropped
    assert [(p.chosen, p.rejected) for p in pair_set.pairs] == [([8, 2], [7, 2])]
    assert (pair_set.ref_chosen.tolist() == pytest.approx([-1.6])
            and pair_set.ref_rejected.tolist() == pytest.approx([-0.6]))
    assert metrics == {"pairs/count": 1.0, "pairs/dropped_ties": 1.0, "pairs/reward_margin_mean": 1.0}
    assert rows == [{"prompt": "1+1=", "chosen": "82", "rejected": "72", "chosen_reward": 1.0, "rejected_reward": 0.0}]
    # KL estimate: mean over samples of Σ (policy − reference) on the sampled tokens
    expected = ((0.0) + (0.5) + (-0.9) + 0.0 + 0.0 + 0.0) / 6
    assert sequence_kl(scored) == pytest.approx(expected)


def test_rso_selection_reports_acceptance_rate():
    cfg = _stage("stages.onpolicy_dpo.sampling.samples_per_prompt=4", "stages.onpolicy_dpo.selection.method=rso",
                 "stages.onpolicy_dpo.selection.rso_samples=2", "stages.onpolicy_dpo.selection.rso_beta=0.001")
    samples = [_sample([i], [-1.0]) for i in range(4)]
    scored = Scored(["p"] * 4, samples, [0.0, 1.0, 0.5, 0.2], [[-1.0]] * 4)
    pair_set, _, metrics = pair_up(cfg, scored, scored.ref_logps, random.Random(0))
    assert [(p.chosen, p.rejected) for p in pair_set.pairs] == [([1], [2])]  # tiny β: the top 2
    assert metrics["rso/acceptance_rate"] == 0.5


def test_pair_up_with_auxiliary_rewards_weights_both_sides_against_the_prompt_mean():
    import torch

    cfg = _stage("stages.onpolicy_dpo.sampling.samples_per_prompt=3",
                 "stages.onpolicy_dpo.auxiliary=[{name: terse, function: 'pipelines.tasks.arithmetic:terse'}]",
                 "stages.onpolicy_dpo.upo.temperature=0.5")
    assert "pipelines.tasks.arithmetic:terse" in cfg.function_rewards()
    samples = [_sample([7, 2], [-0.5]), _sample([8, 2], [-1.0]), _sample([9, 2], [-2.0])]
    aux = torch.tensor([[1.0], [0.0], [1.0]], dtype=torch.float64)  # the prompt's mean: 2/3
    scored = Scored(["1+1="] * 3, samples, [0.0, 1.0, 0.5], [[-1.0]] * 3, aux)
    pair_set, rows, _ = pair_up(cfg, scored, scored.ref_logps, random.Random(0))
    (row,) = rows
    # chosen = sample 1 (reward 1, terse 0), rejected = sample 0 (reward 0, terse 1)
    assert pair_set.aux.chosen_rewards.tolist() == [[0.0]] and pair_set.aux.rejected_rewards.tolist() == [[1.0]]
    assert row["chosen_weight"] == pytest.approx(torch.exp(torch.tensor(-2 / 3 / 0.5)).item())
    assert row["rejected_weight"] == pytest.approx(torch.exp(torch.tensor(1 / 3 / 0.5)).item())
    assert (row["chosen_terse"], row["rejected_terse"]) == (0.0, 1.0)
    batch = pair_set.batch([0], pad_id=0)
    assert batch.aux_rejected_weights.tolist() == pytest.approx([row["rejected_weight"]])


def test_a_reference_free_loss_plans_no_reference_role_and_pairs_carry_no_reference_logprobs():
    """On-policy SimPO / ORPO: three roles, no ref_logprobs; the pairs go to the loss without
    reference log-probs (it needs none); a reference for them is an error naming the field."""
    stage = _stage("stages.onpolicy_dpo.dpo.loss_type=orpo")
    plan = plan_pipeline(load_pipeline(SHIPPED, ["stages.onpolicy_dpo.dpo.loss_type=orpo"]))[2]
    assert [r.role for r in plan.roles] == ["policy_trainer", "rollout"]
    assert plan.numbers["reference_logprobs"] == "none (dpo.loss_type orpo is reference-free)"
    cfg = _stage("stages.onpolicy_dpo.sampling.samples_per_prompt=2", "stages.onpolicy_dpo.dpo.loss_type=simpo")
    scored = Scored(["1+1="] * 2, [_sample([7, 2], [-0.5, -0.1]), _sample([8, 2], [-1.0, -0.1])], [0.0, 1.0], None)
    pair_set, _, _ = pair_up(cfg, scored, None, random.Random(0))
    assert pair_set.ref_chosen is None and pair_set.batch([0], pad_id=0).ref_chosen_logps is None
    with pytest.raises(ConfigError, match="reference_mode: dpo.loss_type simpo uses no reference model"):
        _stage("stages.onpolicy_dpo.dpo.loss_type=simpo", "stages.onpolicy_dpo.reference_mode=refresh")
    assert stage.dpo.reference_free


@pytest.mark.parametrize("num_pairs, passes, steps", [
    (200, None, 4),  # enough pairs for 4 steps of 32
    (40, None, 4),   # None: always 4 steps, the 40 pairs drawn 3.2 times
    (40, 1.0, 2),    # one pass: ceil(40 / 32) steps, the second topped up from the start of the pass
    (96, 1.0, 3), (97, 1.0, 4), (500, 1.0, 4),
    (40, 2.0, 3),    # two passes: ceil(80 / 32)
    (5, 1.0, 1),     # at least one step
])
def test_update_steps_stop_at_max_pair_passes(num_pairs, passes, steps):
    assert update_steps(num_pairs, 32, 4, passes) == steps


def test_max_pair_passes_must_be_positive():
    with pytest.raises(ConfigError, match="schedule.max_pair_passes"):
        _stage("stages.onpolicy_dpo.schedule.max_pair_passes=0")


@pytest.mark.parametrize("overrides, overlap", [
    ([], True),  # CPU: the rollout engine, reference, reward and trainer load at once
    ([f"stages.onpolicy_dpo.{r}.gpus_per_worker=1" for r in ("trainer", "reference_group", "reward_group", "rollout")],
     True),  # a whole GPU per rank, none shared
    (["stages.onpolicy_dpo.trainer.gpus_per_worker=0.5", "stages.onpolicy_dpo.reference_group.gpus_per_worker=0.5"],
     False),  # a shared device: one after the other
    (["stages.onpolicy_dpo.placement.colocate=[[policy_trainer, rollout]]"], False),
])
def test_role_setups_overlap_only_where_no_rank_shares_a_device(overrides, overlap):
    assert setups_overlap(_stage(*overrides)) is overlap
