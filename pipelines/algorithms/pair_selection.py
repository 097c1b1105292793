"""Turning K scored samples of one prompt into preference pairs (on-policy DPO).

Every function takes the rewards of one prompt's K samples and returns pairs of sample indices
``(chosen, rejected)`` with ``rewards[chosen] > rewards[rejected]``; a prompt whose candidates tie
gives no pair (counted by the caller as a dropped tie). Pure Python: unit-tested without a model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Pair = tuple[int, int]


def max_min(rewards: Sequence[float]) -> list[Pair]:
    """Chosen = the highest reward, rejected = the lowest (first index on ties); none when all tie."""
    if len(rewards) < 2:
        return []
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    return [(best, worst)] if rewards[best] > rewards[worst] else []


def max_random(rewards: Sequence[float], rng: random.Random) -> list[Pair]:
    """Chosen = the highest reward, rejected = a uniformly random other sample; none if they tie."""
    if len(rewards) < 2:
        return []
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    other = rng.choice([i for i in range(len(rewards)) if i != best])
    return [(best, other)] if rewards[best] > rewards[other] else []


def rso_accept(rewards: Sequence[float], k: int, beta: float, rng: random.Random) -> list[int]:
    """Statistical rejection sampling (Liu et al. 2023, "Statistical Rejection Sampling Improves
    Preference Optimization", Algorithm 1): draw ``k`` of the candidates approximately from the
    optimal policy π*(y|x) ∝ π_sft(y|x)·exp(r(x,y)/β).

    Passes over the unaccepted candidates repeat until ``k`` are accepted (or none remain); in a
    pass, candidate c is accepted when u < exp((r(c) − r_max)/β), u ~ U(0, 1), with r_max the
    maximum over the candidates unaccepted at the start of the pass.

    One difference from the paper's reference code, which visits candidates in their given order:
    each pass visits its current maximum first, then the rest in order. The maximum is accepted
    with probability 1 either way, but in the paper's order it can be crowded out when ``k``
    fills before it is reached; visiting it first makes the best candidate always part of the
    accepted set. As β → ∞ every candidate is accepted in visiting order; as β → 0 only each
    pass's maximum is, which returns the top ``k``.

    Returns:
        Accepted candidate indices, in acceptance order.
    """
    if beta <= 0:
        raise ValueError(f"rso beta must be > 0, got {beta}")
    remaining = list(range(len(rewards)))
    accepted: list[int] = []
    while len(accepted) < k and remaining:
        best = max(remaining, key=lambda i: (rewards[i], -i))
        r_max = rewards[best]
        taken = []
        for c in [best] + [i for i in remaining if i != best]:
            if rng.random() < math.exp((rewards[c] - r_max) / beta):
                accepted.append(c)
                taken.append(c)
                if len(accepted) == k:
                    break
        remaining = [i for i in remaining if i not in taken]
    return accepted


def rank_consecutive(rewards: Sequence[float], accepted: Sequence[int]) -> list[Pair]:
    """First-round ranking of the RSO paper: pair accepted samples (0, 1), (2, 3), …; the higher
    reward is chosen, a tie gives no pair, and an odd last sample is left out."""
    pairs = []
    for a, b in zip(accepted[0::2], accepted[1::2]):
        if rewards[a] != rewards[b]:
            pairs.append((a, b) if rewards[a] > rewards[b] else (b, a))
    return pairs


def select_pairs(rewards: Sequence[float], method: str, rng: random.Random, *, rso_k: int = 2,
                 rso_beta: float = 0.5) -> tuple[list[Pair], int]:
    """Pairs of one prompt under ``method`` (max_min, max_random, rso) and how many samples RSO
    accepted (0 for the other methods)."""
    if method == "max_min":
        return max_min(rewards), 0
    if method == "max_random":
        return max_random(rewards, rng), 0
    if method == "rso":
        accepted = rso_accept(rewards, rso_k, rso_beta, rng)
        return rank_consecutive(rewards, accepted), len(accepted)
    raise ValueError(f"unknown pair selection {method!r} (max_min, max_random, rso)")
