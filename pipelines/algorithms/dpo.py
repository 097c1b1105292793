"""Direct Preference Optimization losses as pure tensor functions.

Every function here takes tensors and plain numbers, never a config object, so each can be
checked against hand-computed values.

References:
    DPO: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
        Reward Model", eq. 7 (sigmoid loss) and eq. 5 (implicit reward r = β·log π/π_ref).
    cDPO: Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO"
        (label smoothing ε).
    Hinge: Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback".
    IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
        Preferences", eq. 17; log-ratios normalised by response length as in common practice.
    Robust DPO: Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
        Feedback", eq. 7.
    RPO: Pang et al. 2024, "Iterative Reasoning Preference Optimization" (NLL on chosen).
    SimPO: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
        eq. 6 (length-normalised reward β·log π/|y|, target margin γ).
    ORPO: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
        eqs. 4–7 (odds of the length-normalised likelihood).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family losses and implicit rewards.

    Args:
        policy_chosen_logps: (B,) summed log π_θ(y_w|x) over completion tokens incl. EOS.
        policy_rejected_logps: (B,) summed log π_θ(y_l|x).
        ref_chosen_logps: (B,) summed log π_ref(y_w|x).
        ref_rejected_logps: (B,) summed log π_ref(y_l|x).
        beta: β > 0, the KL-regularisation strength.
        loss_type: one of "sigmoid", "hinge", "ipo", "robust".
        label_smoothing: ε in [0, 0.5): assumed rate of flipped labels (sigmoid = cDPO, robust).
        chosen_lengths: (B,) completion token counts |y_w|; required for "ipo".
        rejected_lengths: (B,) completion token counts |y_l|; required for "ipo".

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,). Rewards are β·(log π_θ − log π_ref)
        and carry no gradient.

    With h_w = π_w − ref_w, h_l = π_l − ref_l and Δ = h_w − h_l:
        sigmoid: −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)
        hinge:   max(0, 1 − βΔ)
        ipo:     (h_w/|y_w| − h_l/|y_l| − 1/(2β))²
        robust:  (−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)) / (1 − 2ε)
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    eps = label_smoothing

    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type 'ipo' needs chosen_lengths and rejected_lengths")
        normalised = chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths
        losses = (normalised - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (
            1 - 2 * eps
        )
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO losses and rewards; no reference model.

    With x = β·(p_w/|y_w| − p_l/|y_l|) − γ (p: summed policy log-probs, |y|: completion tokens):
    losses = −(1 − ε)·logσ(x) − ε·logσ(−x); rewards = β·p/|y| (no gradient). γ = 0 and ε = 0 give
    −logσ of the length-normalised margin.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen = beta * policy_chosen_logps / chosen_lengths
    rejected = beta * policy_rejected_logps / rejected_lengths
    x = chosen - rejected - gamma
    eps = label_smoothing
    losses = -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)
    return losses, chosen.detach(), rejected.detach()


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(a)) for a < 0, accurate near 0 and for very negative a (Mächler 2012); a is clamped
    just below 0, where the value would be −inf."""
    a = a.clamp(max=-1e-7)
    return torch.where(a > -0.6931471805599453, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    lam: float,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ORPO losses and log odds ratios; no reference model.

    With a = p/|y| (the mean token log-prob, ≤ 0): log_odds = (a_w − a_l) − (log(1 − e^{a_w}) −
    log(1 − e^{a_l})), losses = −a_w − λ·logσ(log_odds) (the SFT term on the chosen response plus
    the odds-ratio term). λ = 0 is length-normalised SFT on the chosen responses. Finite as a → 0.
    """
    a_w = policy_chosen_logps / chosen_lengths
    a_l = policy_rejected_logps / rejected_lengths
    log_odds = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))
    losses = -a_w - lam * F.logsigmoid(log_odds)
    return losses, log_odds.detach()


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Length-normalised negative log-likelihood of the chosen responses (the RPO term).

    Args:
        policy_chosen_logps: (B,) summed log π_θ(y_w|x).
        chosen_lengths: (B,) completion token counts |y_w|.

    Returns:
        (B,) −log π_θ(y_w|x) / |y_w|.
    """
    return -policy_chosen_logps / chosen_lengths.clamp(min=1)


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Batch means of the standard DPO diagnostics.

    Args:
        chosen_rewards: (B,) implicit rewards of chosen responses.
        rejected_rewards: (B,) implicit rewards of rejected responses.
        policy_chosen_logps: (B,) summed policy log-probs of chosen responses.
        policy_rejected_logps: (B,) summed policy log-probs of rejected responses.

    Returns:
        Scalars: rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected} and
        ranking_accuracy (policy itself prefers the chosen response; Chen et al. 2024, "Preference
        Learning Algorithms Do Not Learn Preference Rankings"). Accuracies use a strict ">", so they
        are 0 when policy = reference.
    """
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
        "ranking_accuracy": (policy_chosen_logps > policy_rejected_logps).float().mean(),
    }
