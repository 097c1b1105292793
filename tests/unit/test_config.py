"""Config validation: typed, frozen, errors name the field path; overrides; secret redaction."""

from pathlib import Path

import pytest
import yaml

from orchestrator.config import apply_override, flatten_for_params, load_pipeline, validate_pipeline
from orchestrator.plan import plan_pipeline
from pipelines.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "pipelines" / "offline_dpo.yaml"


def _raw():
    return yaml.safe_load(SHIPPED.read_text())


def _error(raw) -> str:
    with pytest.raises(ConfigError) as exc:
        validate_pipeline(raw)
    return str(exc.value)


def test_shipped_pipeline_loads_frozen():
    config = load_pipeline(SHIPPED)
    assert config.stages[1].dpo.beta == 0.1
    with pytest.raises(Exception):
        config.stages[1].dpo.beta = 1.0  # frozen


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda r: r["stages"][1]["dpo"].update(beta=0), "stages[1].dpo.beta: must be > 0"),
        (lambda r: r["stages"][1]["dpo"].update(beta="abc"), "stages[1].dpo.beta: Input should be a valid number"),
        (lambda r: r["stages"][1]["dpo"].update(betta=0.1), "stages[1].dpo.betta: unknown field"),
        (lambda r: r["stages"][1]["dpo"].update(loss_type="kto"), "stages[1].dpo.loss_type: must be one of"),
        (lambda r: r["stages"][1].update(kind="nope"), "stages[1]: unknown stage kind 'nope'"),
        (lambda r: r["stages"][1].pop("policy"), "stages[1].policy: required field is missing"),
        (lambda r: r["stages"][1]["schedule"].update(pairs_per_microbatch=5),
         "stages[1].schedule.pairs_per_microbatch: 5 does not divide"),
        (lambda r: r["stages"][1]["trainer"].update(num_workers=3),
         "stages[1].schedule.pairs_per_step: 32 is not a positive multiple of trainer.num_workers (3)"),
        (lambda r: r["stages"][1].update(policy={"from": "nowhere"}),
         "stages[1].policy.from: no stage named 'nowhere'"),
        (lambda r: r["stages"][1]["data"].update(train={"from": "task", "output": "model"}),
         "stages[1].data.train: output task.model is a model, but a pairs is needed"),
        (lambda r: r["stages"][1]["data"].update(train={"from": "task", "output": "zzz"}),
         "stages[1].data.train.output: stage 'task' (synthetic_task) has no output 'zzz'"),
        (lambda r: r["stages"][1].update(name="task"), "duplicate stage name 'task'"),
        (lambda r: r.update(stages=[]), "stages: must have at least 1 item"),
    ],
)
def test_errors_name_the_field(mutate, expected):
    raw = _raw()
    mutate(raw)
    assert expected in _error(raw)


def _quickstart() -> dict:
    return yaml.safe_load((ROOT / "pipelines" / "quickstart.yaml").read_text())


def test_reward_model_output_as_policy_is_a_type_error():
    raw = _quickstart()
    raw["stages"][3]["policy"] = {"from": "rm"}  # offline_dpo from the reward model
    assert ("stages[3].policy: a model is needed, but stage 'rm' (reward_model) outputs reward_model (reward_model)"
            in _error(raw))


def test_cycle_is_named():
    raw = _quickstart()
    raw["stages"][1]["policy"] = {"from": "offline_dpo"}  # sft <- offline_dpo <- sft
    assert "stages: the references form a cycle: sft -> offline_dpo -> sft" in _error(raw)


def test_self_reference_is_a_cycle():
    raw = _quickstart()
    raw["stages"][3]["policy"] = {"from": "offline_dpo"}
    assert "cycle: offline_dpo -> offline_dpo" in _error(raw)


def test_stages_run_in_dependency_order():
    raw = _quickstart()
    raw["stages"] = raw["stages"][::-1]  # written backwards: ppo first, task last
    config = validate_pipeline(raw)
    assert [s.name for s in config.stages] == ["task", "sft", "offline_dpo", "onpolicy_dpo", "rm", "ppo", "evaluate"]


def test_no_traceback_text_in_errors():
    raw = _raw()
    raw["stages"][1]["dpo"]["beta"] = -1
    message = _error(raw)
    assert "Traceback" not in message and "pydantic" not in message.lower()


def test_overrides_by_stage_name_and_index():
    config = load_pipeline(SHIPPED, ["stages.offline_dpo.schedule.steps=7", "stages.1.optim.lr=1e-3", "seed=3"])
    assert config.stages[1].schedule.steps == 7
    assert config.stages[1].optim.lr == pytest.approx(1e-3)
    assert config.seed == 3


@pytest.mark.parametrize("item,msg", [("nokey", "expected KEY=VALUE"),
                                      ("stages.zzz.x=1", "no stage named or numbered 'zzz'")])
def test_bad_overrides(item, msg):
    with pytest.raises(ConfigError, match=msg):
        apply_override(_raw(), item)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="pipeline file not found"):
        load_pipeline(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline(bad)


def test_secrets_never_reach_params():
    config = load_pipeline(SHIPPED, ["tracking.uri=https://alice:hunter2@mlflow.example:5000"])
    flat = flatten_for_params(config)
    assert flat["tracking.uri"] == "https://***@mlflow.example:5000"
    assert not any("hunter2" in v for v in flat.values())
    assert flat["stages.offline_dpo.dpo.beta"] == "0.1"


def test_plan_derives_batch_numbers():
    config = load_pipeline(SHIPPED, ["stages.offline_dpo.trainer.num_workers=2",
                                     "stages.offline_dpo.schedule.pairs_per_microbatch=8"])
    plan = plan_pipeline(config)[1]  # the trainer computes the reference log-probs before its first step
    assert plan.numbers["pairs_per_worker_per_step"] == 16
    assert plan.numbers["gradient_accumulation_steps"] == 2
    assert plan.numbers["sequences_per_microbatch"] == 16
    assert [r.role for r in plan.roles] == ["policy_trainer"]


def _sft_rm_raw():
    return yaml.safe_load((SHIPPED.parent / "reward_model.yaml").read_text())


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda r: r["stages"][1]["schedule"].update(sequences_per_microbatch=5),
         "stages[1].schedule.sequences_per_microbatch: 5 does not divide the sequences per worker per step"),
        (lambda r: r["stages"][1]["data"].update(format="jsonl"), "stages[1].data.format: must be one of"),
        (lambda r: r["stages"][1]["data"].update(train={"from": "task", "output": "pairs_train"}),
         "stages[1].data.train: output task.pairs_train is a pairs, but a sft is needed"),
        # A reward model is not a policy: its output cannot feed a stage that needs a causal LM.
        (lambda r: r["stages"].append({"name": "dpo", "kind": "offline_dpo",
                                       "policy": {"from": "rm", "output": "reward_model"},
                                       "data": {"train": {"from": "task", "output": "pairs_train"}}}),
         "stages[3].policy: output rm.reward_model is a reward_model, but a model is needed"),
        (lambda r: r["stages"][2]["loss"].update(centering_coef=-1), "stages[2].loss.centering_coef: must be >= 0"),
    ],
)
def test_sft_and_reward_model_errors_name_the_field(mutate, expected):
    raw = _sft_rm_raw()
    mutate(raw)
    assert expected in _error(raw)


def test_reward_config_needs_exactly_one_source():
    from pydantic import ValidationError

    from pipelines.stages.config import RewardConfig

    assert RewardConfig(function="pipelines.tasks.arithmetic:reward").model is None
    assert RewardConfig(model={"from": "rm"}).model.from_ == "rm"
    for bad in ({}, {"function": "a:b", "model": "/x"}):
        with pytest.raises(ValidationError, match="exactly one of reward.function, reward.model, reward.judge or"):
            RewardConfig(**bad)


def test_plan_of_sft_and_reward_model_stages():
    sft, rm = plan_pipeline(load_pipeline(SHIPPED.parent / "reward_model.yaml"))[1:]
    assert [r.role for r in sft.roles] == ["policy_trainer"] and sft.numbers["sequences_per_microbatch"] == 32
    assert [r.role for r in rm.roles] == ["reward_trainer"] and rm.numbers["sequences_per_microbatch"] == 128


def test_the_pipeline_seed_is_every_stage_seed_unless_a_stage_sets_its_own():
    config = load_pipeline(ROOT / "pipelines" / "quickstart.yaml", ["seed=7", "stages.sft.schedule.seed=1"])
    seeds = {s.name: s.seed if s.kind in ("synthetic_task", "evaluate") else s.schedule.seed for s in config.stages}
    assert seeds == {"task": 7, "sft": 1, "rm": 7, "offline_dpo": 7, "onpolicy_dpo": 7, "ppo": 7, "evaluate": 7}
    assert {s.schedule.seed for s in load_pipeline(ROOT / "pipelines" / "quickstart.yaml").stages
            if s.kind not in ("synthetic_task", "evaluate")} == {0}


QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"


def test_data_from_a_stage_reads_each_input_of_the_type_it_needs():
    """``data: {from: task}`` is ``{train: {from: task}, eval: {from: task}}`` (an evaluate stage's
    ``prompts``): each reads the output of its input's type; a field written beside it wins."""
    config = load_pipeline(QUICKSTART)
    plans = {p.name: p for p in plan_pipeline(config)}
    assert "data.train <- task.sft_train" in plans["sft"].inputs and "data.eval <- task.sft_eval" in plans["sft"].inputs
    assert "data.train <- task.pairs_train" in plans["rm"].inputs
    assert "data.eval <- task.prompts_eval" in plans["ppo"].inputs
    assert plans["evaluate"].inputs[-1] == "data.prompts <- task.prompts_eval"
    mixed = load_pipeline(QUICKSTART, ["stages.sft.data.eval=/data/held_out.parquet"])
    assert mixed.stage("sft").data.eval == "/data/held_out.parquet" and mixed.stage("sft").data.train.from_ == "task"
    with pytest.raises(ConfigError, match=r"stages\[1\].data.train.from: no stage named 'tusk'"):
        load_pipeline(QUICKSTART, ["stages.sft.data={from: tusk}"])


def test_online_roles_fit_two_cpus_unless_the_yaml_says_otherwise():
    config = load_pipeline(QUICKSTART)
    for name in ("onpolicy_dpo", "ppo"):
        (plan,) = [p for p in plan_pipeline(config) if p.name == name]
        assert plan.peak()["CPU"] == 2.0, name
    ppo = config.stage("ppo")
    cpus = (ppo.rollout.cpus_per_worker, ppo.critic_group.cpus_per_worker, ppo.trainer.cpus_per_worker)
    assert cpus == (1.0, 0.25, 0.5)  # the rollout worker scores: it has the reward role's 0.25 too
    assert ppo.rollout.max_model_len == 64  # a section given in part keeps the stage's CPUs for its role
    raised = load_pipeline(QUICKSTART, ["stages.ppo.rollout.cpus_per_worker=4"]).stage("ppo")
    assert raised.rollout.cpus_per_worker == 4 and raised.trainer.cpus_per_worker == 0.5


def test_the_critic_steps_with_the_policys_optimizer_unless_it_has_its_own():
    ppo = load_pipeline(QUICKSTART).stage("ppo")
    assert ppo.critic.optim is None and ppo.optim.lr == 1e-4
    own = load_pipeline(QUICKSTART, ["stages.ppo.critic.optim={lr: 0.001}"]).stage("ppo")
    assert own.critic.optim.lr == 1e-3
