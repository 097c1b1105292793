"""UPO math (pipelines/algorithms/upo.py) against hand values and loop forms."""

import math

import pytest
import torch

from pipelines.algorithms.upo import (
    auxiliary_advantages,
    auxiliary_loss,
    awr_weights,
    expectile_loss,
    explained_variance,
    fit_expectile_value,
    group_mean_baseline,
    upo_objective,
    weighted_auxiliary_reward,
)


def test_weighted_reward_by_hand():
    rewards = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
    assert weighted_auxiliary_reward(rewards, torch.tensor([2.0, -1.0])).tolist() == [2.0, -1.0]
    with pytest.raises(ValueError, match=r"rewards must be \[N, K\]"):
        weighted_auxiliary_reward(rewards, torch.tensor([1.0]))


def test_group_baseline_matches_a_loop():
    torch.manual_seed(0)
    values = torch.randn(40, dtype=torch.float64)
    groups = torch.randint(0, 7, (40,)) * 13 - 5  # arbitrary, non-contiguous ids
    loop = torch.tensor([values[groups == g].mean().item() for g in groups.tolist()], dtype=torch.float64)
    torch.testing.assert_close(group_mean_baseline(values, groups), loop)


def test_uniform_rewards_give_unit_weights():
    rewards = torch.full((6, 2), 0.7)
    adv = auxiliary_advantages(rewards, torch.tensor([1.0, 3.0]), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert adv.abs().max().item() == 0.0
    assert awr_weights(adv, temperature=0.5, max_weight=20.0).tolist() == [1.0] * 6


def test_higher_auxiliary_reward_gets_higher_weight_pair_by_hand():
    # One prompt, chosen and rejected: advantages ±(R_w − R_l)/2.
    rewards = torch.tensor([[1.0], [0.0]])
    adv = auxiliary_advantages(rewards, torch.tensor([1.0]), torch.tensor([4, 4]))
    assert adv.tolist() == [0.5, -0.5]
    w = awr_weights(adv, temperature=0.5, max_weight=20.0)
    assert w[0].item() == pytest.approx(math.e) and w[1].item() == pytest.approx(1 / math.e)


def test_weights_are_clipped_at_max_without_overflow():
    w = awr_weights(torch.tensor([1e4, 0.0, -1e4]), temperature=0.1, max_weight=5.0)
    assert w.tolist() == pytest.approx([5.0, 1.0, 0.0])
    with pytest.raises(ValueError):
        awr_weights(torch.zeros(1), temperature=0.0, max_weight=5.0)


def test_auxiliary_loss_by_hand_and_gradient_only_through_logps():
    logps = torch.tensor([-2.0, -6.0], requires_grad=True)
    weights = torch.tensor([2.0, 0.5], requires_grad=True)
    loss = auxiliary_loss(logps, torch.tensor([2, 3]), weights)
    assert loss.item() == pytest.approx(-(2.0 * -1.0 + 0.5 * -2.0) / 2)
    loss.backward()
    assert logps.grad.tolist() == pytest.approx([-2.0 / 2 / 2, -0.5 / 3 / 2])
    assert weights.grad is None


def test_zero_coefficient_is_exactly_the_preference_loss():
    pref = torch.tensor(0.6931, requires_grad=True)
    aux = torch.tensor(123.0)
    assert upo_objective(pref, aux, coef=0.0) is pref
    assert upo_objective(pref, aux, coef=0.1).item() == pytest.approx(0.6931 + 12.3)


def test_expectile_loss_by_hand():
    # residuals u = target − prediction = [2, −1]; τ = 0.8: (0.8·4 + 0.2·1) / 2
    loss = expectile_loss(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 0.0]), expectile=0.8)
    assert loss.item() == pytest.approx(1.7)
    assert expectile_loss(torch.zeros(2), torch.tensor([2.0, 0.0]), expectile=0.5).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"expectile must be in \(0, 1\)"):
        expectile_loss(torch.zeros(1), torch.zeros(1), expectile=1.0)


def test_a_constant_feature_fits_the_expectile_of_the_targets():
    """With no informative feature V is one number: the τ-expectile of the targets, the m where
    τ·Σ_{y>m}(y − m) = (1 − τ)·Σ_{y<m}(m − y); τ = 0.5 is the mean. Checked against a fine grid."""
    targets = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 3.0], dtype=torch.float64)
    features = torch.ones(6, 1, dtype=torch.float64)
    for tau in (0.5, 0.7, 0.9):
        fitted = fit_expectile_value(features, targets, expectile=tau, l2=0.0)
        grid = torch.linspace(0, 3, 30001, dtype=torch.float64)
        losses = torch.stack([expectile_loss(m.expand(6), targets, expectile=tau) for m in grid])
        assert torch.allclose(fitted, torch.full_like(targets, grid[losses.argmin()].item()), atol=2e-4)
    assert fit_expectile_value(features, targets, expectile=0.5, l2=0.0)[0].item() == pytest.approx(1.0)


def test_a_value_that_depends_on_the_prompt_is_recovered_and_explains_the_variance():
    """Targets R = 2·f + noise, noise 0 or 1 with even odds: V follows the prompt (high explained
    variance), offset by the noise's τ-expectile: 0.5 at τ = 0.5, 0.9 at τ = 0.9 (0.9·0.5·(1 − m) =
    0.1·0.5·m)."""
    torch.manual_seed(0)
    f = torch.randn(400, 3, dtype=torch.float64)
    targets = 2 * f[:, 0] + torch.randint(0, 2, (400,), dtype=torch.float64)
    mid = fit_expectile_value(f, targets, expectile=0.5, l2=1e-6)
    high = fit_expectile_value(f, targets, expectile=0.9, l2=1e-6)
    assert explained_variance(mid, targets) > 0.9
    assert (high - mid).mean().item() == pytest.approx(0.4, abs=0.02)
    assert explained_variance(targets.mean().expand(400), targets) == pytest.approx(0.0)


def test_skipping_ties_zeroes_the_weight_of_responses_at_their_baseline():
    # a pair that differs (±0.5 around its mean) and a pair that ties (both at the mean)
    advantages = auxiliary_advantages(torch.tensor([[1.0], [0.0], [1.0], [1.0]]), torch.tensor([1.0]),
                                      torch.tensor([0, 0, 1, 1]))
    kept = awr_weights(advantages, temperature=0.5, max_weight=20.0)
    skipped = awr_weights(advantages, temperature=0.5, max_weight=20.0, skip_ties=True)
    torch.testing.assert_close(kept, torch.tensor([math.e, math.exp(-1), 1.0, 1.0]))
    torch.testing.assert_close(skipped, torch.tensor([math.e, math.exp(-1), 0.0, 0.0]))
