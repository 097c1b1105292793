"""Comparing policies on the same prompts: pairwise win rates judged by a reward, the percentile
bootstrap over prompts, and the sampled KL to a reference."""

from __future__ import annotations

import torch


def win_rates(policy_scores: torch.Tensor, baseline_scores: torch.Tensor) -> torch.Tensor:
    """Per prompt, the chance that a policy's response beats the baseline's, ties counted half.

    Every response of the policy is compared with every response of the baseline to the same prompt
    (K × K' comparisons), as in the pairwise win rates of AlpacaEval / the DPO paper's GPT-4 judge,
    with the reward as the judge.

    Args:
        policy_scores: (P, K) the judge's score of each of the policy's K responses per prompt.
        baseline_scores: (P, K') the same for the baseline policy.

    Returns:
        (P,) in [0, 1]: mean over the K × K' pairs of 1[s_policy > s_base] + ½·1[s_policy = s_base].
    """
    if policy_scores.dim() != 2 or baseline_scores.dim() != 2 or policy_scores.shape[0] != baseline_scores.shape[0]:
        raise ValueError(f"scores must be (P, K) and (P, K'), got {tuple(policy_scores.shape)} and "
                         f"{tuple(baseline_scores.shape)}")
    diff = policy_scores.unsqueeze(2) - baseline_scores.unsqueeze(1)  # (P, K, K')
    return ((diff > 0).double() + 0.5 * (diff == 0).double()).mean(dim=(1, 2))


def bootstrap_interval(values: torch.Tensor, *, resamples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per prompt; Efron &
    Tibshirani 1993, ch. 13): the prompts are resampled with replacement ``resamples`` times.

    Args:
        values: (P,) per-prompt values (e.g. ``win_rates``).
        confidence: the interval's coverage, e.g. 0.95 gives the 2.5th and 97.5th percentiles.

    Returns:
        (low, high) of the resampled means.
    """
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"values must be a non-empty (P,) tensor, got shape {tuple(values.shape)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, values.numel(), (resamples, values.numel()), generator=generator)
    means = values.double()[idx].mean(dim=1)
    alpha = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return float(low), float(high)


def sampled_kl(policy_logps: list[list[float]], reference_logps: list[list[float]]) -> torch.Tensor:
    """Per response sampled from the policy, Σ_t log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t):
    its mean over the policy's samples estimates KL(π ‖ π_ref) (the k1 estimator; Schulman 2020,
    "Approximating KL divergence"), the quantity PPO's KL penalty and the DPO papers' reward-vs-KL
    frontiers plot.

    Args:
        policy_logps: per response, the policy's log-prob of each sampled token.
        reference_logps: per response, the reference's log-prob of the same tokens.

    Returns:
        (N,) the per-response log-ratio sums.
    """
    if len(policy_logps) != len(reference_logps):
        raise ValueError(f"{len(policy_logps)} policy rows but {len(reference_logps)} reference rows")
    sums = []
    for row, (p, r) in enumerate(zip(policy_logps, reference_logps, strict=True)):
        if len(p) != len(r):
            raise ValueError(f"response {row}: {len(p)} policy log-probs but {len(r)} reference log-probs")
        sums.append(sum(a - b for a, b in zip(p, r, strict=True)))
    return torch.tensor(sums, dtype=torch.float64)


def exact_match(scores: list[float]) -> float:
    """The share of responses a checker scored as right (score ≥ 1): ``eval/exact_match``."""
    return sum(s >= 1.0 for s in scores) / len(scores)
