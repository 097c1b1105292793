"""Loss callables handed to ``PolicyTrainer.train_step``: they run the model and apply pure math.

Each is a small frozen dataclass (picklable, so it travels to the trainer actors) with
``__call__(model, microbatch) -> (loss, metrics)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from actors.batches import PreferenceBatch, SFTBatch
from actors.modeling import next_token_logps, pair_scores, preference_logps, sequence_logps
from pipelines.algorithms.dpo import chosen_nll, dpo_loss, preference_metrics
from pipelines.algorithms.reward_model import bradley_terry_loss, reward_centering_penalty, reward_metrics
from pipelines.algorithms.sft import masked_nll, token_accuracy


@dataclass(frozen=True)
class DPOLoss:
    """DPO-family loss (``pipelines.algorithms.dpo``) plus an optional RPO NLL term on chosen."""

    beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0

    def __call__(self, model: Any, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if batch.ref_chosen_logps is None or batch.ref_rejected_logps is None:
            raise ValueError("DPOLoss needs reference log-probs in the batch")
        policy_chosen, policy_rejected = preference_logps(model, batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, batch.ref_chosen_logps, batch.ref_rejected_logps,
            beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
            chosen_lengths=batch.chosen_lengths(), rejected_lengths=batch.rejected_lengths(),
        )
        loss = losses.mean()
        metrics = preference_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
        if self.rpo_alpha:
            nll = chosen_nll(policy_chosen, batch.chosen_lengths()).mean()
            metrics["loss/nll"] = nll.detach()
            loss = loss + self.rpo_alpha * nll
        metrics["loss"] = loss.detach()
        return loss, metrics



@dataclass(frozen=True)
class SFTLoss:
    """Causal-LM loss on response tokens only: the token-mean NLL of each micro-batch."""

    def __call__(self, model: Any, batch: SFTBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logits = logits[:, :-1].float()
        targets = batch.input_ids[:, 1:]
        token_logps = next_token_logps(logits, targets)
        mask = batch.loss_mask[:, 1:]
        loss, _ = masked_nll(token_logps, mask)
        hits = logits.argmax(-1) == targets
        return loss, {"loss": loss.detach(), "token_accuracy": token_accuracy(hits, mask).detach()}


@dataclass(frozen=True)
class RewardModelLoss:
    """Bradley–Terry loss with the batch's optional margins, plus c · mean((r_w + r_l)²)."""

    centering_coef: float = 0.0

    def __call__(self, model: Any, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = pair_scores(model, batch)
        loss = bradley_terry_loss(chosen, rejected, batch.margin).mean()
        metrics = reward_metrics(chosen.detach(), rejected.detach())
        if self.centering_coef:
            penalty = reward_centering_penalty(chosen, rejected).mean()
            metrics["loss/centering"] = penalty.detach()
            loss = loss + self.centering_coef * penalty
        metrics["loss"] = loss.detach()
        return loss, metrics


def sft_row_nll(model: Any, batch: SFTBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (summed NLL over response tokens (B,), response token count (B,)), for evaluation."""
    logps = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
    return -logps, batch.loss_mask[:, 1:].sum(-1).float()
