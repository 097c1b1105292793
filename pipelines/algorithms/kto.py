"""Kahneman–Tversky Optimization as a pure tensor function.

References:
    KTO: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8
        (value v(x, y) against the reference point z0 = KL(π_θ ‖ π_ref), estimated from mismatched
        prompt/completion pairs of the batch, clamped at 0 and not back-propagated).
"""

from __future__ import annotations

import torch


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO losses and implicit rewards.

    Args:
        policy_logps: (B,) summed log π_θ(y|x) over completion tokens.
        ref_logps: (B,) summed log π_ref(y|x).
        desirable: (B,) bool, True for desirable examples.
        kl: the reference point z0 (a scalar: estimated, clamped at 0 and detached by the caller).
        beta: β > 0.
        desirable_weight, undesirable_weight: λ_D, λ_U.

    Returns:
        (losses, rewards), each (B,): with r = policy − ref, desirable rows λ_D·(1 − σ(β(r − z0))),
        undesirable rows λ_U·(1 − σ(β(z0 − r))); rewards = β·r (no gradient).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    r = policy_logps - ref_logps
    kl = torch.as_tensor(kl, dtype=r.dtype)
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - r)))
    losses = torch.where(desirable.bool(), good, bad)
    return losses, beta * r.detach()
