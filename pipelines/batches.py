"""Typed batches that cross actor boundaries. Every tensor field has the batch size as dim 0."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypeVar

import torch

B = TypeVar("B", bound="TensorBatch")


@dataclass
class TensorBatch:
    """Base: slicing, splitting and device moves over all tensor fields (None fields pass through)."""

    def _tensors(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __len__(self) -> int:
        for value in self._tensors().values():
            if value is not None:
                return int(value.shape[0])
        return 0

    def slice(self: B, start: int, stop: int) -> B:
        return type(self)(**{k: None if v is None else v[start:stop] for k, v in self._tensors().items()})

    def chunks(self: B, size: int) -> list[B]:
        """Consecutive pieces of at most ``size`` rows."""
        return [self.slice(i, i + size) for i in range(0, len(self), size)]

    def split(self: B, parts: int) -> list[B]:
        """``parts`` equal shards (for data-parallel ranks); len must divide evenly."""
        n = len(self)
        if n % parts:
            raise ValueError(f"cannot split a batch of {n} rows into {parts} equal shards")
        return self.chunks(n // parts)

    def to(self: B, device: torch.device | str) -> B:
        return type(self)(**{k: None if v is None else v.to(device) for k, v in self._tensors().items()})


@dataclass
class PreferenceBatch(TensorBatch):
    """B preference pairs, right-padded. Masks are 1 on completion tokens (response incl. EOS).

    Fields:
        chosen_input_ids: (B, Tc) prompt + chosen response token ids.
        chosen_attention_mask: (B, Tc) 1 on real tokens.
        chosen_loss_mask: (B, Tc) 1 on chosen-response tokens.
        rejected_input_ids: (B, Tr) prompt + rejected response token ids.
        rejected_attention_mask: (B, Tr).
        rejected_loss_mask: (B, Tr).
        ref_chosen_logps: (B,) summed reference log-probs of chosen responses, or None.
        ref_rejected_logps: (B,) summed reference log-probs of rejected responses, or None.
        margin: (B,) required reward margin m of each pair (reward-model training), or None.
        aux_chosen_rewards: (B, K) auxiliary (designer) rewards of the chosen responses (UPO), or None.
        aux_rejected_rewards: (B, K) the same for the rejected responses, or None.
        aux_chosen_weights: (B,) advantage weights w of the chosen responses in the auxiliary loss, or None.
        aux_rejected_weights: (B,) the same for the rejected responses, or None.
    """

    chosen_input_ids: torch.Tensor
    chosen_attention_mask: torch.Tensor
    chosen_loss_mask: torch.Tensor
    rejected_input_ids: torch.Tensor
    rejected_attention_mask: torch.Tensor
    rejected_loss_mask: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    margin: torch.Tensor | None = None
    aux_chosen_rewards: torch.Tensor | None = None
    aux_rejected_rewards: torch.Tensor | None = None
    aux_chosen_weights: torch.Tensor | None = None
    aux_rejected_weights: torch.Tensor | None = None

    def chosen_lengths(self) -> torch.Tensor:
        """(B,) completion token counts |y_w|."""
        return self.chosen_loss_mask.sum(-1).float()

    def rejected_lengths(self) -> torch.Tensor:
        """(B,) completion token counts |y_l|."""
        return self.rejected_loss_mask.sum(-1).float()

    def num_tokens(self) -> int:
        """Real (non-pad) tokens over both sides."""
        return int(self.chosen_attention_mask.sum() + self.rejected_attention_mask.sum())


@dataclass
class SFTBatch(TensorBatch):
    """B (prompt, response) sequences, right-padded; the loss covers response tokens only.

    Fields:
        input_ids: (B, T) prompt + response token ids.
        attention_mask: (B, T) 1 on real tokens.
        loss_mask: (B, T) 1 on response tokens (the tokens the model is trained to produce).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class PPOBatch(TensorBatch):
    """B sampled sequences (prompt + response), right-padded, with what the policy-gradient and value
    losses need. Per-token fields are aligned with next-token log-probs: column t scores token t + 1.

    Fields:
        input_ids: (B, T) prompt + response token ids.
        attention_mask: (B, T) 1 on real tokens.
        action_mask: (B, T-1) 1 where column t predicts a response token.
        old_logps: (B, T-1) log-probs of the sampled tokens under the policy that sampled them.
        advantages: (B, T-1) advantage of each response token.
        ref_logps: (B, T-1) reference log-probs (for a KL term in the loss), or None.
        old_values: (B, T-1) critic values at sampling time, or None (critic-free estimators).
        returns: (B, T-1) value targets, or None.
        is_weights: (B, T-1) truncated importance weights of stale samples (asynchronous rollouts), or None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    old_logps: torch.Tensor
    advantages: torch.Tensor
    ref_logps: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> PPOBatch:
        """The rows at ``index`` (1-D long tensor), in that order."""
        return PPOBatch(**{k: None if v is None else v[index] for k, v in self._tensors().items()})

    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())
