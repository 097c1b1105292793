"""On-policy distillation: the student samples, a teacher scores every sampled token, and the per-token
reverse KL is the student's (negative) reward.

The objective is the reverse KL of the student π_θ from the teacher π_T on the student's own samples
(Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes" (GKD), arXiv 2306.13649, with divergence = reverse KL and student data fraction λ = 1):

    KL(π_θ ‖ π_T)(x) = E_{y∼π_θ(·|x)} Σ_t [log π_θ(y_t | x, y_<t) − log π_T(y_t | x, y_<t)]

Its single-sample estimate per token is ``d_t = log π_θ(y_t|·) − log π_T(y_t|·)`` (the k1 estimator at
the sampled token; summed over t it is an unbiased estimate of the sequence's reverse KL). The score-
function gradient of the sequence KL is E[Σ_t ∇log π_θ(y_t|·) · Σ_{s≥t} d_s] (the term E[∇ d_t] of the
sampling distribution is zero in expectation), so the per-token advantage is the negative KL-to-go

    A_t = −Σ_{s≥t} γ^{s−t} d_s

with γ = 1 the unbiased gradient and γ = 0 the per-token form used in practice (each token is
rewarded by its own −d_t only: lower variance, a biased gradient; Thinking Machines' "On-Policy
Distillation", 2025, trains with a discount of zero). A policy-gradient loss (PPO's clipped
surrogate) then minimises the reverse KL; a task reward's advantages may be added to A_t.
"""

from __future__ import annotations

import torch


def reverse_kl_advantages(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *,
                          discount: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reverse KL estimates and the advantages that minimise them.

    Args:
        student: (B, T) log π_θ of each sampled token under the policy that sampled it.
        teacher: (B, T) log π_T of the same tokens under the teacher.
        mask: (B, T) 1 on the tokens the student sampled (0 on padding and environment tokens).
        discount: γ of the KL-to-go, in [0, 1] (0: each token's own −d_t; 1: the unbiased gradient).

    Returns:
        (d, advantages), each (B, T) and zero outside ``mask``: d_t = (log π_θ − log π_T)·mask and
        A_t = −Σ_{s≥t} γ^{s−t} d_s.
    """
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    mask = mask.to(student.dtype)
    d = (student - teacher) * mask
    if discount == 0.0:
        return d, -d
    to_go = torch.zeros_like(d)
    running = torch.zeros(d.shape[0], dtype=d.dtype)
    for t in range(d.shape[1] - 1, -1, -1):  # masked positions pass the running sum through unchanged
        running = d[:, t] + torch.where(mask[:, t] > 0, discount * running, running)
        to_go[:, t] = running
    return d, -to_go * mask


def sequence_reverse_kl(d: torch.Tensor) -> torch.Tensor:
    """(B,) the per-sequence reverse-KL estimate Σ_t d_t of ``reverse_kl_advantages``' ``d`` (B, T)."""
    return d.sum(1)
