"""PPO math against hand-computed values, and vectorised forms against plain loops."""

import math
import random

import pytest
import torch

from pipelines.algorithms.ppo import (
    AdaptiveKLController,
    estimate_advantages,
    explained_variance,
    gae,
    grpo_advantages,
    informative_groups,
    kl_estimate,
    masked_whiten,
    overlong_penalty,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    token_rewards,
    truncated_is_weights,
    value_loss,
)


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert kl_estimate(lp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    # k3 = (ρ − 1) − log ρ, ρ = π_ref/π: ρ = e^-0.5 and e^1
    assert kl_estimate(lp, ref, "k3").tolist() == pytest.approx([math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1.0])
    assert (kl_estimate(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(lp, ref, "k2")


def test_token_rewards_put_the_score_on_the_last_response_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    r = token_rewards(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.1, no_eos=torch.tensor([False, True]),
                      missing_eos_penalty=0.5)
    assert r.tolist() == [pytest.approx([-0.01, -0.02, 1.0 - 0.03]), pytest.approx([-0.05, 2.0 - 0.5 - 0.05, 0.0])]


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, 1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped at +0.2
    assert ctl.update(6.0, 1000) == pytest.approx(0.1 * 1.02)  # on target: unchanged
    assert ctl.update(3.0, 1000) == pytest.approx(0.1 * 1.02 * (1 - 0.2 * 0.1))


def _gae_loop(rewards, values, gamma, lam):
    """Textbook GAE over one unpadded sequence."""
    adv, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_v = values[t + 1] if t + 1 < len(rewards) else 0.0
        last = rewards[t] + gamma * next_v - values[t] + gamma * lam * last
        adv[t] = last
    return adv


def test_gae_hand_values_and_loop_equivalence():
    r, v, m = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3)
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([0.5, 0.4, 0.3])  # return-to-go (1) minus V
    assert ret.tolist()[0] == pytest.approx([1.0, 1.0, 1.0])

    rng = random.Random(0)
    lengths = [5, 2, 7, 1]
    T = max(lengths)
    rewards, values, mask = torch.zeros(4, T), torch.zeros(4, T), torch.zeros(4, T)
    for i, n in enumerate(lengths):
        rewards[i, :n] = torch.tensor([rng.gauss(0, 1) for _ in range(n)])
        values[i, :n] = torch.tensor([rng.gauss(0, 1) for _ in range(n)])
        values[i, n:] = 9.0  # garbage beyond the response must not leak in
        mask[i, :n] = 1.0
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    for i, n in enumerate(lengths):
        want = _gae_loop(rewards[i, :n].tolist(), values[i, :n].tolist(), 0.9, 0.95)
        assert adv[i, :n].tolist() == pytest.approx(want, abs=1e-6)
        assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0
        assert ret[i, :n].tolist() == pytest.approx([a + b for a, b in zip(want, values[i, :n].tolist())], abs=1e-6)


def test_whitening_over_masked_entries():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    w = masked_whiten(x, m)
    vals = w[m.bool()]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-6) and vals.std().item() == pytest.approx(1.0, abs=1e-4)
    assert w[1, 1:].tolist() == [0.0, 0.0]


def test_policy_loss_clipping_and_dual_clip():
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    m = torch.ones(1, 3)
    loss, stats = policy_loss(logps, old, adv, m, clip_eps=0.2)
    # per token max(−A·ρ, −A·clip(ρ)): −1.2, 0.8 (clip at 0.8 for A<0 gives 0.8 > 0.5), −2.2
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert stats["policy/clipfrac"].item() == pytest.approx(2 / 3)
    # dual clip caps the loss of a negative advantage with a huge ratio at −c·A
    big = torch.log(torch.tensor([[10.0]]))
    capped, _ = policy_loss(big, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1), clip_eps=0.2,
                            dual_clip=3.0)
    assert capped.item() == pytest.approx(3.0)
    uncapped, _ = policy_loss(big, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1), clip_eps=0.2)
    assert uncapped.item() == pytest.approx(10.0)


def test_truncated_importance_weights_and_the_weighted_loss():
    """w = min(π_prox/μ, cap) per token, 0 on padding; the loss weighs each token's clipped term by it,
    and weights of 1 give the unweighted loss back."""
    proximal = torch.log(torch.tensor([[0.5, 0.4, 0.9]]))
    behaviour = torch.log(torch.tensor([[0.25, 0.5, 0.3]]))  # ratios 2, 0.8, 3 (the last is padding)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w, stats = truncated_is_weights(proximal, behaviour, mask, cap=1.5)
    assert w.tolist()[0] == pytest.approx([1.5, 0.8, 0.0])
    assert stats["is/weight_mean"].item() == pytest.approx((1.5 + 0.8) / 2)
    assert stats["is/clip_frac"].item() == pytest.approx(0.5)
    assert stats["is/ratio_max"].item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="cap must be >= 1"):
        truncated_is_weights(proximal, behaviour, mask, cap=0.5)

    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios to the proximal policy 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    ones = torch.ones(1, 3)
    weighted, _ = policy_loss(logps, torch.zeros(1, 3), adv, ones, clip_eps=0.2,
                              is_weights=torch.tensor([[2.0, 0.5, 1.0]]))
    assert weighted.item() == pytest.approx((2.0 * -1.2 + 0.5 * 0.8 - 2.2) / 3)
    plain, _ = policy_loss(logps, torch.zeros(1, 3), adv, ones, clip_eps=0.2)
    same, _ = policy_loss(logps, torch.zeros(1, 3), adv, ones, clip_eps=0.2, is_weights=torch.ones(1, 3))
    assert same.item() == plain.item()


def test_value_loss_clipping():
    v, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.1]])
    loss, stats = value_loss(v, old, ret, torch.ones(1, 2), clip_eps=0.2)
    # token 1: max((1−2)², (0.2−2)²) = 3.24; token 2: max(0.01, 0.01) = 0.01
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.01) / 2)
    assert stats["val/clipfrac"].item() == pytest.approx(0.5)


def test_group_baselines():
    same = torch.tensor([0.7, 0.7, 0.7, 0.7, 1.0, 0.0, 0.0, 1.0])
    grpo = grpo_advantages(same, 4)
    assert grpo[:4].abs().max() == 0  # identical rewards in a group: no signal
    assert grpo[4:].tolist() == pytest.approx([0.866, -0.866, -0.866, 0.866], abs=1e-3)  # ±0.5 / std 0.577
    rloo = rloo_advantages(same, 4)
    assert rloo[:4].abs().max() == 0
    assert rloo[4:].tolist() == pytest.approx([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3])
    scores = torch.randn(12)
    assert rloo_advantages(scores, 3).view(-1, 3).sum(dim=1).abs().max() < 1e-6  # sums to 0 per group


def test_reinforce_pp_returns_are_discounted_then_globally_whitened():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = reinforce_pp_advantages(rewards, mask, gamma=1.0)
    raw = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]])  # returns-to-go
    assert torch.allclose(adv, masked_whiten(raw, mask))
    assert adv[mask.bool()].sum().item() == pytest.approx(0.0, abs=1e-5) and adv[1, 2] == 0


def test_estimate_advantages_per_estimator():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    rewards = token_rewards(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.zeros(4, 3), mask, kl_coef=0.0)
    values = torch.rand(4, 3)
    adv, ret = estimate_advantages("ppo", rewards, mask, values=values, gamma=1.0, lam=0.9, whiten=False)
    want_adv, want_ret = gae(rewards, values, mask, gamma=1.0, lam=0.9)
    assert torch.allclose(adv, want_adv) and torch.allclose(ret, want_ret)
    whitened, _ = estimate_advantages("ppo", rewards, mask, values=values, gamma=1.0, lam=0.9)
    assert torch.allclose(whitened, masked_whiten(want_adv, mask))
    with pytest.raises(ValueError, match="needs critic values"):
        estimate_advantages("ppo", rewards, mask)

    # Groups of 2: identical rewards give zero advantages; RLOO sums to zero in each group.
    grpo, none = estimate_advantages("grpo", rewards, mask, group_size=2)
    assert none is None
    assert grpo[2:].abs().max() == 0  # samples 3 and 4 both scored 1
    assert grpo[0, 0] > 0 > grpo[1, 0] and (grpo * (1 - mask)).abs().max() == 0
    rloo, _ = estimate_advantages("rloo", rewards, mask, group_size=2)
    assert rloo[:, 0].view(2, 2).sum(dim=1).tolist() == pytest.approx([0.0, 0.0])
    assert rloo[0].tolist() == [1.0, 1.0, 0.0]  # 1 − the other sample's 0, on each of its tokens
    rpp, _ = estimate_advantages("reinforce_pp", rewards, mask)
    assert torch.allclose(rpp, reinforce_pp_advantages(rewards, mask))
    with pytest.raises(ValueError, match="unknown estimator"):
        estimate_advantages("a2c", rewards, mask)


def test_group_estimators_use_the_in_reward_kl():
    mask = torch.ones(2, 2)
    kl = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # the second sample drifted from the reference
    rewards = token_rewards(torch.tensor([1.0, 1.0]), kl, mask, kl_coef=0.5)
    rloo, _ = estimate_advantages("rloo", rewards, mask, group_size=2)
    assert rloo[:, 0].tolist() == pytest.approx([1.0, -1.0])  # returns 1 and 0 (1 − 0.5·2)


def test_explained_variance():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 3.0, 99.0]])
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), returns, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(torch.zeros(1, 3), torch.ones(1, 3), mask))


def test_clip_higher_widens_only_the_upper_bound():
    """DAPO's clip-higher: ratio 1.3 with A > 0 is clipped at 1 + clip_eps_high, ratio 0.7 with A < 0
    at 1 − clip_eps as before; None is the symmetric clip."""
    logps = torch.log(torch.tensor([[1.3, 0.7]]))
    old, adv, mask = torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 0.0]])
    symmetric, _ = policy_loss(logps, old, adv, mask, clip_eps=0.2)
    higher, _ = policy_loss(logps, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    torch.testing.assert_close((symmetric, higher), (torch.tensor(-1.2), torch.tensor(-1.28)))
    low = torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(policy_loss(logps, old, adv, low, clip_eps=0.2, clip_eps_high=0.28)[0],
                               torch.tensor(0.8))


def test_loss_aggregation_modes():
    """Per-token losses [[1, 2, ·], [4, ·, ·]] (ratio 1, loss = −A): token mean 7/3, mean of the
    sequences' token means (1.5 + 4)/2, and Dr. GRPO's Σ / (B · T) = 7/6."""
    adv = -torch.tensor([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    zeros = torch.zeros(2, 3)
    got = {agg: policy_loss(zeros, zeros, adv, mask, clip_eps=0.2, loss_agg=agg)[0]
           for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")}
    torch.testing.assert_close(got, {"token_mean": torch.tensor(7 / 3), "seq_mean_token_mean": torch.tensor(2.75),
                                     "seq_mean_token_sum_norm": torch.tensor(7 / 6)})
    assert policy_loss(zeros, zeros, adv, mask, clip_eps=0.2)[0] == got["token_mean"]  # the default
    with pytest.raises(ValueError, match="unknown loss_agg"):
        policy_loss(zeros, zeros, adv, mask, clip_eps=0.2, loss_agg="sum")


def test_grpo_advantages_without_std_scaling():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    torch.testing.assert_close(grpo_advantages(scores, 4, scale=False),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]))


def test_dr_grpo_normaliser_can_be_the_generation_budget():
    """Σ over tokens / (B · T) with T given: a micro-batch trimmed to its longest row keeps the
    normaliser of the whole batch (1 + 2 + 4 = 7 over 2 rows x 8 tokens)."""
    adv = -torch.tensor([[1.0, 2.0], [4.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    zeros = torch.zeros(2, 2)
    loss, _ = policy_loss(zeros, zeros, adv, mask, clip_eps=0.2, loss_agg="seq_mean_token_sum_norm", norm_tokens=8)
    torch.testing.assert_close(loss, torch.tensor(7 / 16))


def test_overlong_penalty_is_linear_over_the_buffer():
    """max_tokens 10, buffer 4: no penalty up to 6 tokens, −0.25 per token after, −1 (× penalty) at 10."""
    lengths = torch.tensor([3, 6, 7, 8, 10, 12])
    torch.testing.assert_close(overlong_penalty(lengths, max_tokens=10, buffer=4),
                               torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, max_tokens=10, buffer=4, penalty=2.0)[-2], torch.tensor(-2.0))
    with pytest.raises(ValueError, match="0 < buffer <= max_tokens"):
        overlong_penalty(lengths, max_tokens=10, buffer=11)


def test_informative_groups_are_those_whose_rewards_differ():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5 + 1e-12])
    assert informative_groups(scores, 3).tolist() == [False, True, False]
    # a group of equal rewards has zero group-baseline advantage everywhere: nothing to learn
    assert grpo_advantages(scores, 3, scale=False)[:3].abs().max() == 0


def test_micro_batches_weigh_by_rows_for_the_per_sequence_aggregations():
    """The trainer weights each micro-batch's loss by ``weight``: loss tokens for token_mean (a token
    mean over the step), rows for the per-sequence means (a mean over the step's sequences)."""
    from pipelines.data.batches import PPOBatch
    from pipelines.losses import PolicyGradientLoss

    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    zeros = torch.zeros(2, 4)
    batch = PPOBatch(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long), mask, zeros, zeros)
    assert PolicyGradientLoss().weight(batch) == 4.0
    for agg in ("seq_mean_token_mean", "seq_mean_token_sum_norm"):
        assert PolicyGradientLoss(loss_agg=agg, norm_tokens=4).weight(batch) == 2.0
