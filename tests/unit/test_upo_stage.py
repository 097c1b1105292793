"""UPO in the DPO stages: the auxiliary config, its plan, the weights of the training responses, the
UPO loss on the tiny model, the reward set, and the example task's second answer style."""

import dataclasses
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from actors.modeling import preference_logps
from actors.reward import RewardSet
from orchestrator.config import load_pipeline, validate_pipeline
from orchestrator.plan import plan_pipeline
from pipelines.errors import ConfigError, RewardError
from pipelines.losses import DPOLoss, UPOLoss
from pipelines.stages.auxiliary import AuxiliaryTerm, advantage_weights
from pipelines.tasks import arithmetic

SHIPPED = Path(__file__).resolve().parents[2] / "pipelines" / "upo.yaml"
TERSE = "pipelines.tasks.arithmetic:terse"


def _raw():
    return yaml.safe_load(SHIPPED.read_text())


def _error(raw) -> str:
    with pytest.raises(ConfigError) as exc:
        validate_pipeline(raw)
    return str(exc.value)


def test_shipped_pipeline_compares_dpo_and_upo_from_one_sft():
    config = load_pipeline(SHIPPED)
    dpo, upo = config.stage("dpo"), config.stage("upo")
    assert dpo.upo.coef == 0 and upo.upo.coef > 0
    assert dpo.auxiliary == upo.auxiliary and dpo.schedule == upo.schedule and dpo.data == upo.data
    plan = {p.name: p for p in plan_pipeline(config)}["upo"]
    # the trainer computes the reference log-probs before its first step; the auxiliary rewards' group
    # lives beside it (held-out scoring)
    assert [r.role for r in plan.roles] == ["policy_trainer", "reward"]
    assert plan.phases == (("reward", "policy_trainer"),)
    assert plan.peak()["CPU"] == 2.0
    assert "pipelines.tasks.arithmetic:sentence" in upo.function_rewards()


def test_plain_dpo_plans_no_reward_group():
    raw = _raw()
    for s in raw["stages"][2:]:
        s.pop("auxiliary"), s.pop("upo")
    stage = validate_pipeline(raw).stage("upo")
    assert stage.phases() == (("reference",), ("policy_trainer",))
    assert "reward" not in stage.role_configs()


def test_auxiliary_config_errors_name_the_field():
    raw = _raw()
    raw["stages"][3]["auxiliary"].append({"name": "sentence", "function": TERSE})
    assert "auxiliary[1].name: 'sentence' is used twice" in _error(raw)

    raw = _raw()
    raw["stages"][3]["auxiliary"][0]["model"] = {"from": "sft"}
    assert "give exactly one of reward.function, reward.model, reward.judge or reward.served" in _error(raw)

    raw = _raw()
    raw["stages"][3]["auxiliary"] = [{"name": "rm", "model": {"from": "sft"}}]  # an SFT model is no reward model
    assert "stages[3].auxiliary.0.model: a reward_model is needed" in _error(raw)

    raw = _raw()
    raw["stages"][3].pop("auxiliary")
    assert "upo: set, but auxiliary lists no rewards" in _error(raw)

    raw = _raw()
    raw["stages"][3]["upo"]["max_weight"] = 0.5
    assert "upo.max_weight" in _error(raw)

    raw = _raw()
    raw["stages"][3]["auxiliary"][0]["Name"] = "x"
    assert "auxiliary.0.Name" in _error(raw) or "auxiliary[0].Name" in _error(raw)


def test_a_reward_model_auxiliary_reads_an_upstream_stage(tmp_path):
    raw = _raw()
    raw["stages"].insert(2, {"name": "rm", "kind": "reward_model", "model": {"from": "sft"},
                             "data": {"train": {"from": "task", "output": "pairs_train"}}})
    raw["stages"][4]["auxiliary"].append({"name": "quality", "model": {"from": "rm"}, "weight": 0.5})
    config = validate_pipeline(raw)
    upo = config.stage("upo")
    assert upo.inputs()["auxiliary.1.model"] == ("reward_model", "reward_model")
    plan = {p.name: p for p in plan_pipeline(config)}["upo"]
    assert "auxiliary.1.model <- rm.reward_model" in plan.inputs
    assert [s.name for s in config.stages].index("rm") < [s.name for s in config.stages].index("upo")


def _cfg(temperature=0.25, max_weight=20.0, weights=(1.0,)):
    aux = [{"name": f"r{k}", "function": TERSE, "weight": w} for k, w in enumerate(weights)]
    raw = _raw()
    raw["stages"][3]["auxiliary"] = aux
    raw["stages"][3]["upo"] = {"coef": 1.0, "temperature": temperature, "max_weight": max_weight}
    return validate_pipeline(raw).stage("upo")


def test_weights_use_every_response_to_the_same_prompt_as_the_baseline():
    # prompt a: chosen terse (1), rejected verbose (0), and a second pair both terse; prompt b: all verbose.
    prompts = ["a", "a", "b"]
    chosen = torch.tensor([[1.0], [1.0], [0.0]], dtype=torch.float64)
    rejected = torch.tensor([[0.0], [1.0], [0.0]], dtype=torch.float64)
    wc, wr = advantage_weights(_cfg().auxiliary_objective(), prompts, chosen, rejected)
    # group a: rewards 1, 1, 0, 1 → mean 0.75; A = +0.25 / −0.75; τ = 0.25 → w = e^1, e^-3
    torch.testing.assert_close(wc, torch.tensor([torch.e, torch.e, 1.0]))
    torch.testing.assert_close(wr, torch.tensor([torch.exp(torch.tensor(-3.0)), torch.e, 1.0]))


def test_weights_combine_rewards_with_their_coefficients_and_clip():
    prompts = ["a", "a"]
    chosen = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    rejected = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    # R = 2·r0 − 1·r1: chosen [2, 0], rejected [−1, 0]; mean 0.25 → A = 1.75, −0.25, −1.25, −0.25
    objective = _cfg(temperature=1.0, max_weight=3.0, weights=(2.0, -1.0)).auxiliary_objective()
    wc, wr = advantage_weights(objective, prompts, chosen, rejected)
    torch.testing.assert_close(wc, torch.tensor([3.0, torch.exp(torch.tensor(-0.25)).item()]))  # e^1.75 clipped
    torch.testing.assert_close(wr, torch.exp(torch.tensor([-1.25, -0.25])))


def _term(batch, chosen_w, rejected_w):
    n = len(batch)
    return AuxiliaryTerm(("terse",), torch.ones(n, 1), torch.zeros(n, 1), torch.tensor(chosen_w),
                         torch.tensor(rejected_w))


def test_upo_loss_with_zero_coef_is_exactly_dpo(tiny_model_dir, batch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dpo = DPOLoss(beta=0.1, rpo_alpha=1.0)
    idx = list(range(len(batch)))
    b = _term(batch, [2.0] * len(batch), [0.5] * len(batch)).attach(batch, idx)
    dpo_loss, _ = dpo(model, b)
    upo_loss, metrics = UPOLoss(dpo, 0.0, ("terse",))(model, b)
    assert torch.equal(upo_loss, dpo_loss)
    assert metrics["loss/pref"] == dpo_loss.detach() and metrics["loss/aux"] > 0
    assert metrics["aux/terse_mean"] == 0.5 and metrics["aux/weight_max"] == 2.0
    assert metrics["aux/weight_mean"] == pytest.approx(1.25)


def test_upo_loss_adds_the_weighted_length_normalised_likelihood(tiny_model_dir, batch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    idx = list(range(len(batch)))
    b = _term(batch, [3.0] * len(batch), [0.0] * len(batch)).attach(batch, idx)
    loss, metrics = UPOLoss(DPOLoss(beta=0.1), 0.5, ("terse",))(model, b)
    with torch.no_grad():
        chosen, _ = preference_logps(model, b)
    aux = -(3.0 * chosen / b.chosen_lengths()).sum() / (2 * len(batch))  # rejected weights 0, mean over 2N
    torch.testing.assert_close(metrics["loss/aux"], aux)
    torch.testing.assert_close(loss.detach(), metrics["loss/pref"] + 0.5 * aux)
    loss.backward()  # the weights are constants: the gradient flows through the log-probs only
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_upo_loss_of_preferred_responses_only_leaves_the_rejected_ones_out(tiny_model_dir, batch):
    """upo.responses: preferred: the auxiliary likelihood covers the chosen responses (mean over them),
    however the rejected ones are weighted: it never raises a rejected response."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    b = _term(batch, [3.0] * len(batch), [20.0] * len(batch)).attach(batch, list(range(len(batch))))
    _, metrics = UPOLoss(DPOLoss(beta=0.1), 0.5, ("terse",), preferred_only=True)(model, b)
    with torch.no_grad():
        chosen, _ = preference_logps(model, b)
    torch.testing.assert_close(metrics["loss/aux"], -(3.0 * chosen / b.chosen_lengths()).mean())


def test_upo_loss_needs_the_auxiliary_fields(tiny_model_dir, batch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="auxiliary rewards and weights"):
        UPOLoss(DPOLoss(beta=0.1), 1.0, ("terse",))(model, dataclasses.replace(batch))


def test_reward_set_scores_each_item_under_each_reward_and_names_a_failing_one(tiny_reward_model_dir):
    rs = RewardSet(0, 1, (("terse", TERSE, None, False), ("correct", "pipelines.tasks.arithmetic:reward", None, False),
                          ("rm", None, str(tiny_reward_model_dir), False)))
    rs.setup()
    rows = rs.score_chunk((["1+2=", "1+2=", "5+5="], ["3", "sum is 3", "sum is 11"]))
    assert [r[:2] for r in rows] == [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]
    assert all(isinstance(r[2], float) for r in rows) and rows[0][2] != rows[1][2]
    bad = RewardSet(0, 1, (("bad", "pipelines.tasks.arithmetic:check", None, False),))
    bad.setup()
    with pytest.raises(RewardError, match="auxiliary reward 'bad'"):
        bad.score_chunk((["1+2="], ["3"]))


def test_task_second_style_is_independent_of_preference_and_off_by_default(tmp_path):
    args = dict(max_operand=20, num_sft=400, num_pairs=400, num_prompts=10, num_eval=20, eval_fraction=0.1, seed=3)
    plain = arithmetic.write_datasets(tmp_path / "plain", **args)
    again = arithmetic.write_datasets(tmp_path / "zero", **args, verbose_fraction=0.0)
    styled = arithmetic.write_datasets(tmp_path / "styled", **args, verbose_fraction=0.5)
    assert pq.read_table(plain["pairs_train"]).equals(pq.read_table(again["pairs_train"]))
    base, mixed = pq.read_table(plain["pairs_train"]).to_pydict(), pq.read_table(styled["pairs_train"]).to_pydict()
    assert base["prompt"] == mixed["prompt"]
    for side in ("chosen", "rejected"):  # the same answers, about half of them reworded
        assert [r.removeprefix("sum is ") for r in mixed[side]] == base[side]
        assert 0.4 < sum(r.startswith("sum is ") for r in mixed[side]) / 400 < 0.6
    both = [c.startswith("sum") == r.startswith("sum") for c, r in zip(mixed["chosen"], mixed["rejected"])]
    assert 0.4 < sum(both) / 400 < 0.6  # the style of the chosen side says nothing about the rejected
    assert arithmetic.reward(mixed["prompt"][:50], mixed["chosen"][:50]) == [1.0] * 50
    sft = pq.read_table(styled["sft_train"]).to_pydict()["response"]
    assert 0.4 < sum(r.startswith("sum is ") for r in sft) / 400 < 0.6


def test_terse_scores_the_bare_number_right_or_wrong():
    assert arithmetic.terse(["1+2="] * 4, ["3", " 4 ", "sum is 3", ""]) == [1.0, 1.0, 0.0, 0.0]
    assert arithmetic.check("1+2=", "sum is 3") == 1.0 and arithmetic.check("1+2=", "sum is 4") == 0.0
    assert arithmetic.restyle(["1", "2"], 0.0, random.Random(0)) == ["1", "2"]


class _LocalGroup:
    """Stands in for the reward ActorGroup: runs a real RewardSet in-process and counts the items scored."""

    def __init__(self, reward_set):
        self.reward_set, self.items = reward_set, 0
        reward_set.setup()

    def balanced(self, method, chunks):
        self.items += sum(len(p) for p, _ in chunks)
        return [getattr(self.reward_set, method.__name__)(c) for c in chunks]


def _no_inputs(field):
    raise AssertionError("function rewards resolve no inputs")


def test_training_responses_are_scored_once_and_cached(tmp_path):
    from pipelines.stages.auxiliary import CACHE_FILE, AuxiliaryScorer

    objective = _cfg().auxiliary_objective()
    group = _LocalGroup(RewardSet(0, 1, (("r0", TERSE, None, False),)))
    scorer = AuxiliaryScorer(objective, group, 64, tmp_path, objective.specs(_no_inputs))
    rows = {"prompt": ["1+2=", "1+2=", "4+4="], "chosen": ["3", "sum is 3", "8"], "rejected": ["sum is 4", "4", "9"]}
    term = scorer.term(rows)
    assert group.items == 6  # chosen and rejected alike
    torch.testing.assert_close(term.chosen_rewards[:, 0], torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(term.rejected_rewards[:, 0], torch.tensor([0.0, 1.0, 1.0]))
    assert term.chosen_weights[0] > 1 > term.chosen_weights[1] and term.chosen_weights[2] == 1.0
    cached = pq.read_table(tmp_path / CACHE_FILE).to_pydict()
    assert cached["r0"] == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]  # one row per response: the chosen, then the rejected
    assert cached["response"] == rows["chosen"] + rows["rejected"] and cached["prompt"] == rows["prompt"] * 2

    again = scorer.term(rows)  # a resumed stage: nothing is scored again
    assert group.items == 6 and torch.equal(again.chosen_weights, term.chosen_weights)
    scorer.term({**rows, "chosen": ["3", "3", "8"]})  # other texts: scored afresh
    assert group.items == 12
    assert term.data_metrics()["aux/data_r0_mean"] == pytest.approx(4 / 6)


class _ModelGroup:
    """Stands in for a trainer group of two ranks: runs ``fn`` on a real model, shard by shard."""

    num_workers = 2

    def __init__(self, model):
        self.model, self.shards = model, 0

    def shard(self, method, batches, fn):
        self.shards += len(batches)
        with torch.no_grad():
            return [fn(self.model, b) for b in batches]


def test_value_baseline_fits_the_prompt_part_of_the_reward_and_weights_what_beats_it(tiny_model_dir):
    """upo.baseline: value. Rewards R = 1 on every response to prompt A, and 0 or 1 on prompt B's: the
    value, an expectile fit on the starting policy's prompt states, is ≈ 1 on A (A's responses get
    weight ≈ 1: nothing beats the prompt's value) and between 0 and 1 on B (B's good response is
    weighted above its bad one). Its metrics are logged."""
    from actors.modeling import last_token_states, load_causal_lm
    from pipelines.stages.auxiliary import prompt_features, value_weights

    raw = _raw()
    raw["stages"][3]["auxiliary"] = [{"name": "r0", "function": TERSE}]
    raw["stages"][3]["upo"] = {"temperature": 0.5, "baseline": "value", "expectile": 0.5}
    cfg = validate_pipeline(raw).stage("upo")
    group = _ModelGroup(load_causal_lm(str(tiny_model_dir), dtype=torch.float32).eval())
    a, b = [1, 5, 6, 7], [1, 9, 10]
    prompts = [a, a, a, b, b, b]
    rewards = torch.tensor([[1.0], [1.0], [1.0], [1.0], [0.0], [0.0]], dtype=torch.float64)
    w, metrics = value_weights(cfg.auxiliary_objective(), rewards, prompts, group, None, pad_id=0)
    assert group.shards == 2  # the two distinct prompts, one per rank
    torch.testing.assert_close(w[:3], torch.ones(3), atol=1e-3, rtol=0)
    assert w[3] > 1 > w[4] and w[4] == w[5]
    assert metrics["upo/value_prompts"] == 2 and metrics["upo/value_explained_variance"] > 0.3
    assert metrics["upo/value_loss"] >= 0
    # the features are the model's last-layer state at each prompt's last token
    feats = prompt_features(group, None, [a, b], pad_id=0)
    from pipelines.data.batches import SFTBatch
    ids = torch.tensor([b])
    one = last_token_states(group.model, SFTBatch(ids, torch.ones_like(ids), torch.zeros_like(ids)))
    torch.testing.assert_close(feats[1:], one)


def test_value_baseline_is_for_offline_stages():
    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "pipelines" / "onpolicy_dpo.yaml").read_text())
    raw["stages"][2]["auxiliary"] = [{"name": "r0", "function": TERSE}]
    raw["stages"][2]["upo"] = {"baseline": "value"}
    with pytest.raises(ConfigError, match="upo.baseline: value is fitted once on an offline stage"):
        validate_pipeline(raw)
