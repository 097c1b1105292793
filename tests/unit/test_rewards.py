"""Function rewards: the shipped task checker, and clear errors naming the reward and the item."""

import pickle

import pytest

from pipelines.data.rewards import FunctionReward
from pipelines.errors import RewardError

BAD = "tests.unit.fixtures.bad_rewards"


def test_shipped_task_reward():
    reward = FunctionReward("pipelines.tasks.arithmetic:reward")
    assert reward.score(["1+1=", "20+22="], ["2", "41"]) == [1.0, 0.0]
    assert pickle.loads(pickle.dumps(reward)).score(["3+4="], ["7"]) == [1.0]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("no_colon", "expected 'module:function'"),
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
        ("pipelines.tasks.arithmetic:nope", "module 'pipelines.tasks.arithmetic' has no attribute 'nope'"),
        (f"{BAD}:NOT_CALLABLE", "'NOT_CALLABLE' is not callable"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(RewardError, match=message):
        FunctionReward(spec).score(["1+1="], ["2"])


def test_raising_function_names_the_item():
    with pytest.raises(RewardError, match=r"raised ZeroDivisionError: float division by zero for item 2 "
                                          r"\(prompt 'c', response 'x'\)"):
        FunctionReward(f"{BAD}:raises_on_x").score(["a", "b", "c"], ["1", "2", "x"])


def test_wrong_length():
    with pytest.raises(RewardError, match=r"returned 4 scores for 3 responses"):
        FunctionReward(f"{BAD}:wrong_length").score(["a", "b", "c"], ["1", "2", "3"])


def test_nan_names_the_item():
    with pytest.raises(RewardError, match=r"returned nan for item 1 \(prompt 'b', response '2'\)"):
        FunctionReward(f"{BAD}:nan_for_second").score(["a", "b"], ["1", "2"])


def test_non_numeric():
    with pytest.raises(RewardError, match=r"returned non-numeric 'high' for item 0"):
        FunctionReward(f"{BAD}:not_numbers").score(["a"], ["1"])
