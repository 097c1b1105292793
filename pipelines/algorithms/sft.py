"""Supervised fine-tuning loss as a pure tensor function.

Reference: Ouyang et al. 2022, "Training language models to follow instructions with human
feedback", section 3.5 (SFT on demonstrations); loss on response tokens only, as in common practice.
"""

from __future__ import annotations

import torch


def masked_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean negative log-likelihood over the masked (response) tokens.

    Args:
        token_logps: (B, T) log p(x_t | x_<t) of each target token.
        mask: (B, T) 1 on tokens that count (response tokens), 0 on prompt and padding.

    Returns:
        (loss, num_tokens): the scalar token-mean NLL, and the number of tokens it averages over.
    """
    weights = mask.to(token_logps.dtype)
    count = weights.sum()
    return -(token_logps * weights).sum() / count.clamp(min=1.0), count


def token_accuracy(logits_argmax_hits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of masked positions where the most likely token is the target.

    Args:
        logits_argmax_hits: (B, T) bool, True where argmax of the logits equals the target token.
        mask: (B, T) 1 on tokens that count.
    """
    weights = mask.to(torch.float32)
    return (logits_argmax_hits.to(torch.float32) * weights).sum() / weights.sum().clamp(min=1.0)
