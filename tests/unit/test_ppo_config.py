"""The ppo stage's config: checks that name the field, the plan with and without a critic."""

from pathlib import Path

import pytest
import yaml

from orchestrator.config import load_pipeline, validate_pipeline
from orchestrator.plan import plan_pipeline
from pipelines.errors import ConfigError

SHIPPED = Path(__file__).resolve().parents[2] / "pipelines" / "ppo.yaml"


def _raw():
    return yaml.safe_load(SHIPPED.read_text())


def test_shipped_ppo_plans_four_roles_and_its_step_numbers():
    plan = plan_pipeline(load_pipeline(SHIPPED))[2]
    assert [r.role for r in plan.roles] == ["policy_trainer", "critic", "reference", "rollout"]  # it scores
    assert plan.peak()["CPU"] == 2.0
    s = load_pipeline(SHIPPED).stage("ppo").schedule
    samples = s.prompts_per_iteration * 4
    assert plan.numbers["samples_per_iteration"] == samples
    assert plan.numbers["samples_per_step"] == samples // s.minibatches_per_epoch
    assert plan.numbers["total_steps"] == s.iterations * s.ppo_epochs * s.minibatches_per_epoch


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_estimators_plan_no_critic(estimator):
    config = load_pipeline(SHIPPED, [f"stages.ppo.algorithm.estimator={estimator}"])
    plan = plan_pipeline(config)[2]
    assert "critic" not in [r.role for r in plan.roles]
    kl = config.stage("ppo").algorithm.kl
    assert kl.in_loss(estimator) == (estimator == "grpo")
    assert kl.estimator_for(estimator) == ("k3" if estimator == "grpo" else "k1")


def test_kl_placement_and_estimator_can_be_set():
    kl = load_pipeline(SHIPPED, ["stages.ppo.algorithm.kl.placement=loss",
                                 "stages.ppo.algorithm.kl.estimator=k1"]).stage("ppo").algorithm.kl
    assert kl.in_loss("ppo") and kl.estimator_for("ppo") == "k1"


@pytest.mark.parametrize("changes, message", [
    ({("algorithm", "estimator"): "grpo", ("sampling", "samples_per_prompt"): 1},
     "sampling.samples_per_prompt: grpo compares samples of one prompt, it needs >= 2, got 1"),
    ({("schedule", "minibatches_per_epoch"): 3}, "schedule.minibatches_per_epoch: 3 does not divide the 256 samples"),
    ({("schedule", "samples_per_microbatch"): 48}, "schedule.samples_per_microbatch: a minibatch of 128 samples"),
    ({("critic_group", "num_workers"): 3}, "critic_group.num_workers = 3"),
    ({("critic", "init"): "reward_model"}, "critic.init: reward_model needs critic.model or reward.model"),
    ({("algorithm", "dual_clip"): 0.5}, "algorithm.dual_clip"),
    ({("rollout", "max_model_len"): 16}, "rollout.max_model_len: 16 < data.max_prompt_length + max_new_tokens = 22"),
    ({("rollout", "old_logprobs"): "rollout", ("rollout", "max_staleness"): 1},
     "old_logprobs: 'rollout' needs max_staleness: 0"),
    ({("sampling", "dynamic"): True, ("sampling", "samples_per_prompt"): 1}, "sampling.dynamic: drops prompts"),
    ({("sampling", "dynamic"): True, ("rollout", "max_staleness"): 1}, "sampling.dynamic: not available with rollout"),
    ({("algorithm", "overlong_buffer"): 7}, "algorithm.overlong_buffer: 7 exceeds sampling.max_new_tokens (6)"),
    ({("algorithm", "loss_agg"): "sum"}, "algorithm.loss_agg"),
])
def test_inconsistent_config_names_the_field(changes, message):
    raw = _raw()
    for (section, key), value in changes.items():
        raw["stages"][2].setdefault(section, {})[key] = value
    with pytest.raises(ConfigError) as exc:
        validate_pipeline(raw)
    assert message in str(exc.value)


def test_a_critic_colocated_without_a_critic_is_an_error():
    raw = _raw()
    raw["stages"][2]["algorithm"]["estimator"] = "rloo"
    raw["stages"][2]["placement"] = {"colocate": [["policy_trainer", "critic"]]}
    with pytest.raises(ConfigError, match=r"placement.colocate\[0\]: estimator rloo has no critic role"):
        validate_pipeline(raw)
    raw["stages"][2]["algorithm"]["estimator"] = "ppo"
    plan = plan_pipeline(validate_pipeline(raw))[2]
    assert plan.group_of("critic").roles == ("policy_trainer", "critic")


def test_shipped_dapo_sets_each_of_its_changes_and_the_loss_gets_them():
    """pipelines/dapo.yaml: clip-higher, dynamic sampling, token-mean loss, overlong shaping, no KL;
    the policy loss the stage builds carries them (the Dr. GRPO normaliser is the generation budget)."""
    from pipelines.stages.ppo import policy_loss_of

    config = load_pipeline(SHIPPED.with_name("dapo.yaml"))
    stage = config.stage("dapo")
    a = stage.algorithm
    assert ((a.estimator, a.clip_eps, a.clip_eps_high, a.loss_agg, a.overlong_buffer, a.kl.coef)
            == ("grpo", 0.2, 0.28, "token_mean", 2, 0.0))
    assert stage.sampling.dynamic and "critic" not in [r.role for r in plan_pipeline(config)[2].roles]
    loss = policy_loss_of(stage, kl_coef=0.05)
    assert ((loss.clip_eps, loss.clip_eps_high, loss.loss_agg, loss.norm_tokens, loss.kl_coef)
            == (0.2, 0.28, "token_mean", 6, 0.05))
    assert policy_loss_of(load_pipeline(SHIPPED).stage("ppo"), 0.05).kl_coef == 0  # ppo: the KL is in the reward
