"""Win rates, the bootstrap interval and the sampled KL against hand-computed values."""

import pytest
import torch

from pipelines.algorithms.evaluation import bootstrap_interval, sampled_kl, win_rates


def test_win_rates_by_hand_with_ties_counted_half():
    policy = torch.tensor([[1.0, 0.0], [0.5, 0.5], [2.0, 2.0]])
    baseline = torch.tensor([[0.0, 1.0, 0.5], [0.5, 0.5, 0.5], [1.0, 3.0, 2.0]])
    # prompt 0: 1 vs (0, 1, .5) -> 1, .5, 1; 0 vs (0, 1, .5) -> .5, 0, 0 : 3 / 6
    # prompt 1: all ties -> .5
    # prompt 2: 2 vs (1, 3, 2) -> 1, 0, .5 (twice): 1.5 / 3
    assert win_rates(policy, baseline).tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert win_rates(torch.tensor([[3.0]]), torch.tensor([[1.0]])).tolist() == [1.0]
    assert win_rates(torch.tensor([[1.0]]), torch.tensor([[3.0]])).tolist() == [0.0]


def test_win_rate_of_a_policy_against_itself_is_one_half():
    scores = torch.rand(50, 4, generator=torch.Generator().manual_seed(0))
    assert win_rates(scores, scores).mean().item() == pytest.approx(0.5)


def test_win_rates_reject_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(P, K\)"):
        win_rates(torch.zeros(3, 2), torch.zeros(4, 2))


def test_bootstrap_interval_brackets_the_mean_and_is_degenerate_for_constants():
    assert bootstrap_interval(torch.full((20,), 0.75)) == pytest.approx((0.75, 0.75))
    values = torch.tensor([0.0] * 50 + [1.0] * 50)
    low, high = bootstrap_interval(values, resamples=4000, confidence=0.95, seed=1)
    # The mean's standard error is sqrt(.25 / 100) = .05: the 95% interval is about .5 ± .098.
    assert low == pytest.approx(0.5 - 0.098, abs=0.02) and high == pytest.approx(0.5 + 0.098, abs=0.02)
    narrower = bootstrap_interval(values, resamples=4000, confidence=0.5, seed=1)
    assert low < narrower[0] < 0.5 < narrower[1] < high
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)  # seeded


def test_sampled_kl_sums_the_log_ratios_per_response():
    kl = sampled_kl([[-1.0, -2.0], [-0.5], []], [[-1.5, -1.0], [-0.5], []])
    assert kl.tolist() == pytest.approx([0.5 - 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="response 0: 2 policy log-probs but 1"):
        sampled_kl([[-1.0, -2.0]], [[-1.0]])
