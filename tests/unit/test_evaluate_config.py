"""The evaluate stage's config as the quickstart ships it, its short form, and errors that name the
field; the comparison table the CLI prints from its output; the architecture check that runs
before any engine starts."""

import io
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.config import load_pipeline
from orchestrator.plan import plan_pipeline
from orchestrator.report import comparison_table
from pipelines.errors import ConfigError, DataError
from pipelines.stages.evaluate import check_same_architecture

QUICKSTART = Path(__file__).resolve().parents[2] / "pipelines" / "quickstart.yaml"


def test_the_quickstart_ends_by_comparing_its_policies_against_sft():
    config = load_pipeline(QUICKSTART)
    stage = config.stage("evaluate")
    assert [p.name for p in stage.policies] == ["sft", "offline_dpo", "onpolicy_dpo", "ppo"]
    assert [p.model.from_ for p in stage.policies] == ["sft", "offline_dpo", "onpolicy_dpo", "ppo"]
    assert (stage.baseline_name, stage.reference_name) == ("sft", "sft")
    assert "policies.3.model <- ppo.model" in stage.edges()
    plan = plan_pipeline(config)[-1]
    assert [r.role for r in plan.roles] == ["rollout"]  # the checker judges, in the driver: no reward role
    with_reward = load_pipeline(QUICKSTART, ["stages.evaluate.reward={function: pipelines.tasks.arithmetic:reward}"])
    assert [r.role for r in plan_pipeline(with_reward)[-1].roles] == ["rollout", "reward"]


def test_bad_evaluate_config_names_the_field():
    with pytest.raises(ConfigError, match=r"baseline: 'base' is not one of the policies"):
        load_pipeline(QUICKSTART, ["stages.evaluate.baseline=base"])
    with pytest.raises(ConfigError, match=r"policies: the name 'sft' is given twice"):
        load_pipeline(QUICKSTART, ["stages.evaluate.policies=[{from: sft}, {name: sft, model: /m}]"])
    with pytest.raises(ConfigError, match=r"policies\[0\]: give \{name: NAME, model: /m\}"):
        load_pipeline(QUICKSTART, ["stages.evaluate.policies=[/m]"])
    with pytest.raises(ConfigError, match="reward: give a reward"):
        load_pipeline(QUICKSTART, ["stages.evaluate.reward=null", "stages.evaluate.checker=null"])
    with pytest.raises(ConfigError, match=r"output task.pairs_eval is a pairs, but a prompts is needed"):
        load_pipeline(QUICKSTART, ["stages.evaluate.data.prompts={from: task, output: pairs_eval}"])


def test_without_a_reward_the_checker_judges_and_no_reward_role_starts():
    config = load_pipeline(QUICKSTART, ["stages.evaluate.reward=null"])
    assert config.stage("evaluate").numbers()["judge"] == "checker"
    assert [r.role for r in plan_pipeline(config)[-1].roles] == ["rollout"]


def test_policies_of_another_architecture_are_refused_by_name(tiny_model_dir, tmp_path):
    same = tmp_path / "same"
    shutil.copytree(tiny_model_dir, same)
    check_same_architecture(["a", "b"], [str(tiny_model_dir), str(same)])
    (same / "model.safetensors").unlink()
    with pytest.raises(DataError, match=r"policies\[1\] \(b\): .* is not the architecture of policies\[0\] \(a\)"):
        check_same_architecture(["a", "b"], [str(tiny_model_dir), str(same)])


def test_the_comparison_table_shows_each_policy_and_its_interval():
    comparison = {"baseline": "sft", "reference": "sft", "judge": "reward", "confidence": 0.9, "policies": [
        {"policy": "sft", "reward_mean": 0.5, "exact_match": 0.7, "kl": 0.0, "response_length_mean": 3.0,
         "win_rate": 0.5, "win_rate_low": 0.5, "win_rate_high": 0.5},
        {"policy": "ppo", "reward_mean": 0.8, "exact_match": 0.85, "kl": 1.25, "response_length_mean": 3.5,
         "win_rate": 0.66, "win_rate_low": 0.61, "win_rate_high": 0.71}]}
    buf = io.StringIO()
    Console(file=buf, width=160).print(comparison_table("evaluate", comparison))
    text = buf.getvalue()
    assert "win rate vs sft [90% CI]" in text
    assert "0.660 [0.610, 0.710]" in text and "0.850" in text and "1.250" in text
