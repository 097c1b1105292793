"""Reward-model losses as pure tensor functions.

References:
    Bradley & Terry 1952, "Rank Analysis of Incomplete Block Designs"; as a reward-model loss:
        Ouyang et al. 2022, "Training language models to follow instructions with human feedback", eq. 1.
    Margin: Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", eq. 2.
    Reward centring: Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but
        do not Eliminate Reward Hacking", section 3 (auxiliary loss c·(r_w + r_l)²).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-pair Bradley–Terry loss −log σ(r_w − r_l − m).

    Args:
        chosen_rewards: (B,) scalar rewards r_w of the chosen responses.
        rejected_rewards: (B,) scalar rewards r_l of the rejected responses.
        margin: (B,) optional per-pair margin m ≥ 0 (how much better chosen is); None means 0.

    Returns:
        (B,) losses. At r_w = r_l the loss is log 2; with margin m it is −log σ(−m).
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def reward_centering_penalty(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair (r_w + r_l)²: pushes rewards towards zero mean; weight it by the centring coefficient c.

    Args:
        chosen_rewards: (B,) rewards r_w.
        rejected_rewards: (B,) rewards r_l.

    Returns:
        (B,) squared sums; the loss term is c · mean((r_w + r_l)²).
    """
    return (chosen_rewards + rejected_rewards) ** 2


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch statistics of a reward model on pairs.

    Args:
        chosen_rewards: (B,) rewards r_w.
        rejected_rewards: (B,) rewards r_l.

    Returns:
        accuracy (fraction r_w > r_l), margin (mean r_w − r_l), and reward/mean, reward/std over all
        2B rewards.
    """
    both = torch.cat([chosen_rewards, rejected_rewards])
    return {
        "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "margin": (chosen_rewards - rejected_rewards).mean(),
        "reward/mean": both.mean(),
        "reward/std": both.std(unbiased=False),
    }
