"""Loss callables handed to ``PolicyTrainer.train_step``: they run the model and apply pure math.

Each is a small frozen dataclass (picklable, so it travels to the trainer actors) with
``__call__(model, microbatch) -> (loss, metrics)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from actors.batches import PreferenceBatch
from actors.modeling import preference_logps
from pipelines.algorithms.dpo import chosen_nll, dpo_loss, preference_metrics


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

