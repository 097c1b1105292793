"""Pair selection of on-policy DPO: max_min, max_random, and RSO (statistical rejection sampling)."""

import random

import pytest

from pipelines.algorithms.pair_selection import (
    max_min,
    max_random,
    rank_consecutive,
    rso_accept,
    select_pairs,
)


def test_max_min_pairs_extremes_and_drops_ties():
    assert max_min([0.2, 0.9, -1.0, 0.5]) == [(1, 2)]
    assert max_min([1.0, 1.0, 1.0]) == []
    assert max_min([0.0, 1.0, 1.0, 0.0]) == [(1, 0)]  # first index among equal extremes
    assert max_min([3.0]) == []


def test_max_random_pairs_the_best_with_a_random_other():
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        (pair,) = max_random([0.1, 0.7, 0.3, 0.2], rng)
        assert pair[0] == 1 and pair[1] != 1
        seen.add(pair[1])
    assert seen == {0, 2, 3}  # every other sample gets drawn
    assert max_random([1.0, 0.0, 1.0], random.Random(1)) in ([(0, 1)], [])  # a tie with the other: dropped
    assert all(max_random([0.5, 0.5], random.Random(s)) == [] for s in range(5))


def test_rso_always_accepts_the_maximum():
    rng = random.Random(0)
    for _ in range(300):
        rewards = [rng.gauss(0, 1) for _ in range(8)]
        k = rng.randint(1, 8)
        accepted = rso_accept(rewards, k, rng.choice([0.01, 0.5, 5.0, 1e6]), rng)
        assert len(accepted) == k and len(set(accepted)) == k
        assert max(range(8), key=rewards.__getitem__) in accepted


def test_rso_huge_beta_accepts_in_order_and_tiny_beta_returns_the_top_k():
    rewards = [0.3, -0.2, 0.9, 0.1, 0.5, -1.0]
    # β → ∞: every candidate passes; after the maximum (visited first) they come in order
    assert rso_accept(rewards, 4, 1e9, random.Random(0)) == [2, 0, 1, 3]
    # β → 0: only each pass's maximum passes, so the accepted set is the top k by reward
    assert rso_accept(rewards, 3, 1e-6, random.Random(0)) == [2, 4, 0]
    assert rso_accept(rewards, 10, 1e-6, random.Random(0)) == [2, 4, 0, 3, 1, 5]  # k > K: all, best first


def test_rso_acceptance_follows_the_tilted_distribution():
    rng = random.Random(0)
    assert all(rso_accept([0.0, 1.0], 1, 1.0, rng) == [1] for _ in range(50))  # k = 1: the maximum
    # k = 2 of rewards (0, 1, 2), β = 1: after the maximum, a candidate passes with probability
    # exp(r − 2), so the middle one (e^-1) should be the second far more often than the lowest (e^-2).
    counts = {0: 0, 1: 0}
    for _ in range(4000):
        accepted = rso_accept([0.0, 1.0, 2.0], 2, 1.0, rng)
        counts[accepted[1]] += 1
    assert counts[1] > 2 * counts[0]  # the higher reward is accepted more often


def test_rank_consecutive_and_select_pairs():
    rewards = [0.0, 1.0, 0.5, 0.5, 2.0]
    assert rank_consecutive(rewards, [4, 0, 2, 3, 1]) == [(4, 0)]  # (2, 3) tie dropped, odd 1 left out
    pairs, accepted = select_pairs(rewards, "rso", random.Random(0), rso_k=2, rso_beta=1e-6)
    assert pairs == [(4, 1)] and accepted == 2
    assert select_pairs(rewards, "max_min", random.Random(0)) == ([(4, 0)], 0)
    with pytest.raises(ValueError, match="unknown pair selection 'best'"):
        select_pairs(rewards, "best", random.Random(0))
    with pytest.raises(ValueError, match="rso beta must be > 0"):
        rso_accept(rewards, 2, 0.0, random.Random(0))
