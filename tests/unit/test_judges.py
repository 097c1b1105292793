"""Generative judges without an engine: the verdict parser (choices, regex, scale, unparsable), the
template check, and the ``reward.judge`` config read and checked when the YAML loads."""

from pathlib import Path

import pytest

from orchestrator.config import load_pipeline
from pipelines.data.judges import JudgeSpec, VerdictSpec, parse_verdict
from pipelines.errors import ConfigError
from pipelines.tasks.arithmetic import JUDGE_TEMPLATE, judge_rows, judge_verdict

ROOT = Path(__file__).resolve().parents[2]
JUDGE = ROOT / "pipelines" / "judge.yaml"


def test_choices_match_the_label_the_verdict_starts_with():
    spec = VerdictSpec(choices=(("yes", 1.0), ("no", 0.0), ("not sure", 0.5)))
    assert parse_verdict(" Yes, it is", spec) == 1.0
    assert parse_verdict("no", spec) == 0.0
    assert parse_verdict("not sure", spec) == 0.5  # the longest label first: not "no"
    assert parse_verdict("maybe", spec) is None
    assert parse_verdict("", spec) is None
    strict = VerdictSpec(choices=(("yes", 1.0),), case_sensitive=True)
    assert parse_verdict("Yes", strict) is None and parse_verdict("yes", strict) == 1.0


def test_regex_verdicts_and_their_scale():
    spec = VerdictSpec(regex=r"score:\s*(\d+(?:\.\d+)?)", scale=(0.0, 10.0))
    assert parse_verdict("score: 7", spec) == pytest.approx(0.7)
    assert parse_verdict("I'd say score:10.0.", spec) == pytest.approx(1.0)
    assert parse_verdict("no score here", spec) is None
    assert parse_verdict("42", VerdictSpec(regex=r"\d+")) == 42.0  # no group: the whole match
    assert parse_verdict("x", VerdictSpec(regex=r"(x)")) is None  # the match is not a number


def test_bad_parsers_and_templates_are_refused():
    with pytest.raises(ConfigError, match="give choices"):
        VerdictSpec()
    with pytest.raises(ConfigError, match="does not compile"):
        VerdictSpec(regex="(")
    spec = JudgeSpec("m", "Q: {prompt} A: {response}?", VerdictSpec(regex="x"))
    assert spec.render("1+2=", "{prompt}") == "Q: 1+2= A: {prompt}?"  # a response is never re-rendered


def test_the_judge_pipeline_reads_its_judge_config():
    cfg = load_pipeline(JUDGE).stage("grpo")
    judge = cfg.reward.judge
    assert judge.template == JUDGE_TEMPLATE  # what the judge was trained to read
    spec = cfg.reward.source(lambda field: {"reward.judge.model": "/m"}[field])
    assert isinstance(spec, JudgeSpec) and spec.model_path == "/m" and spec.dtype == "float32"
    assert "reward" in cfg.role_configs()  # a judge runs in the reward role, never in the rollout workers

    def bad(*overrides):
        with pytest.raises(ConfigError) as err:
            load_pipeline(JUDGE, list(overrides))
        return str(err.value)

    assert "must contain {response}" in bad("stages.grpo.reward.judge.template=no placeholders")
    assert "exactly one of reward.function" in bad("stages.grpo.reward.function=pipelines.tasks.arithmetic:reward")
    assert "does not compile" in bad("stages.grpo.reward.judge.verdict.regex=(")
    assert "normalize" in bad("stages.grpo.reward.normalize=true")


def test_judge_rows_teach_right_and_wrong_answers_equally():
    rows = judge_rows({"prompt": ["1+2=", "3+4="], "chosen": ["3", "7"], "rejected": ["4", "17"]})
    assert rows == {"prompt": ["1+2=3 right?", "1+2=4 right?", "3+4=7 right?", "3+4=17 right?"],
                    "response": ["3=3;yes", "3=4;no", "7=7;yes", "7=17;no"]}
    # the judge's held-out accuracy grades the verdict, not the worked-out sum
    assert judge_verdict(rows["prompt"], ["3;yes", "9;no", "7;no", "x;no"]) == [1.0, 1.0, 0.0, 1.0]
    assert judge_verdict(["1+2=4 right?"], ["yes"]) == [0.0]


def test_a_regex_finds_the_label_the_choices_score():
    spec = VerdictSpec(choices=(("yes", 1.0), ("no", 0.0)), regex=";(yes|no)")
    assert parse_verdict("46;yes", spec) == 1.0 and parse_verdict("46;No", spec) == 0.0
    assert parse_verdict("46 yes", spec) is None  # the regex finds nothing: unparsable
