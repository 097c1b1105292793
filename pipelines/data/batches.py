"""Typed batches that cross actor boundaries. Every tensor field has the batch size as dim 0."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch

B = TypeVar("B", bound="TensorBatch")


@dataclass
class TensorBatch:
    """Base: slicing, splitting and device moves over all tensor fields (None fields pass through).

    ``PADDED`` names each attention mask and the right-padded fields that share its width (or that
    width minus one: next-token fields); ``trimmed`` and ``token_microbatches`` use it.
    """

    PADDED: ClassVar[dict[str, tuple[str, ...]]] = {}

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

    def select(self: B, index: torch.Tensor | list[int]) -> B:
        """The rows at ``index``, in that order."""
        index = torch.as_tensor(index, dtype=torch.long)
        return type(self)(**{k: None if v is None else v[index] for k, v in self._tensors().items()})

    def row_lengths(self) -> torch.Tensor:
        """(B, masks) per row and attention mask, the position after its last real token."""
        columns = [getattr(self, mask) for mask in self.PADDED]
        return torch.stack([(m.bool() * torch.arange(1, m.shape[1] + 1)).amax(-1) for m in columns], dim=-1)

    def num_tokens(self) -> int:
        """Real (non-pad) tokens over every attention mask."""
        return int(sum(getattr(self, mask).sum() for mask in self.PADDED))

    def positions(self) -> int:
        """Positions a forward pass over the batch computes, padding included."""
        return sum(getattr(self, mask).numel() for mask in self.PADDED)

    def trimmed(self: B) -> tuple[B, int]:
        """The batch without the trailing columns that are padding in every row (the same numbers
        for every real token: padding is on the right and attention is causal), and how many
        columns the first mask lost (to pad per-token results back to the full width)."""
        if not self.PADDED or len(self) == 0:
            return self, 0
        fields = self._tensors()
        removed = []
        for (mask, padded), keep in zip(self.PADDED.items(), self.row_lengths().amax(0).tolist(), strict=True):
            width = fields[mask].shape[1]
            keep = max(int(keep), 1)
            removed.append(width - keep)
            for name in padded:
                value = fields[name]
                if value is not None:
                    fields[name] = value[:, : keep - (width - value.shape[1])]
        return type(self)(**fields), removed[0]

    def token_microbatches(self, tokens: int, count: int | None = None) -> list[torch.Tensor]:
        """Row indices of micro-batches formed by a token budget: rows sorted by length (longest
        first) and packed while rows × longest row (summed over the masks) stays within ``tokens``;
        a row longer than the budget is a micro-batch of its own. With ``count``, the largest
        micro-batches are halved until there are ``count`` (ranks that reduce gradients per
        micro-batch must all run the same number); ``count`` must not exceed the rows."""
        lengths = self.row_lengths()
        order = torch.argsort(lengths.sum(-1), descending=True, stable=True).tolist()
        groups: list[list[int]] = []
        longest = torch.zeros(lengths.shape[1], dtype=lengths.dtype)
        for row in order:
            wider = torch.maximum(longest, lengths[row])
            if groups and (len(groups[-1]) + 1) * int(wider.sum()) <= tokens:
                groups[-1].append(row)
                longest = wider
            else:
                groups.append([row])
                longest = lengths[row].clone()
        if count is not None:
            if count > len(self):
                raise ValueError(f"cannot form {count} micro-batches from {len(self)} rows")
            while len(groups) < count:
                i = max(range(len(groups)), key=lambda g: len(groups[g]))
                half = len(groups[i]) // 2
                groups[i : i + 1] = [groups[i][:half], groups[i][half:]]
        return [torch.tensor(g, dtype=torch.long) for g in groups]


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

    PADDED: ClassVar[dict[str, tuple[str, ...]]] = {
        "chosen_attention_mask": ("chosen_input_ids", "chosen_attention_mask", "chosen_loss_mask"),
        "rejected_attention_mask": ("rejected_input_ids", "rejected_attention_mask", "rejected_loss_mask"),
    }

    def chosen_lengths(self) -> torch.Tensor:
        """(B,) completion token counts |y_w|."""
        return self.chosen_loss_mask.sum(-1).float()

    def rejected_lengths(self) -> torch.Tensor:
        """(B,) completion token counts |y_l|."""
        return self.rejected_loss_mask.sum(-1).float()


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

    PADDED: ClassVar[dict[str, tuple[str, ...]]] = {"attention_mask": ("input_ids", "attention_mask", "loss_mask")}


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
        behaviour_logps: (B, T-1) the rollout engine's log-probs of the sampled tokens, carried when
            ``old_logps`` is None: the update is the only pass over the samples, so π_old is the
            trainer's own log-probs before it (taken detached in the loss, no separate forward), and
            the loss measures the train–inference gap and, for stale samples, the importance weights.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    old_logps: torch.Tensor | None
    advantages: torch.Tensor
    ref_logps: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None
    behaviour_logps: torch.Tensor | None = None

    PADDED: ClassVar[dict[str, tuple[str, ...]]] = {
        "attention_mask": ("input_ids", "attention_mask", "action_mask", "old_logps", "advantages", "ref_logps",
                           "old_values", "returns", "is_weights", "behaviour_logps"),
    }

    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class KTOBatch(TensorBatch):
    """B unpaired examples (KTO), right-padded, each with a mismatched completion for the reference
    point: row i's prompt followed by another row's completion. Masks are 1 on completion tokens.

    Fields:
        input_ids: (B, T) prompt + completion token ids.
        attention_mask: (B, T) 1 on real tokens.
        loss_mask: (B, T) 1 on completion tokens.
        kl_input_ids: (B, Tk) the same prompt + another example's completion (for z0 = KL(π ‖ π_ref)).
        kl_attention_mask: (B, Tk).
        kl_loss_mask: (B, Tk).
        desirable: (B,) 1.0 for a desirable completion, 0.0 for an undesirable one.
        ref_logps: (B,) summed reference log-probs of the completions.
        ref_kl_logps: (B,) summed reference log-probs of the mismatched completions.
        aux_rewards: (B, K) auxiliary (designer) rewards of the completions (UPO), or None.
        aux_weights: (B,) their advantage weights in the auxiliary loss, or None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    kl_input_ids: torch.Tensor
    kl_attention_mask: torch.Tensor
    kl_loss_mask: torch.Tensor
    desirable: torch.Tensor
    ref_logps: torch.Tensor
    ref_kl_logps: torch.Tensor
    aux_rewards: torch.Tensor | None = None
    aux_weights: torch.Tensor | None = None

    PADDED: ClassVar[dict[str, tuple[str, ...]]] = {
        "attention_mask": ("input_ids", "attention_mask", "loss_mask"),
        "kl_attention_mask": ("kl_input_ids", "kl_attention_mask", "kl_loss_mask"),
    }

    def lengths(self) -> torch.Tensor:
        """(B,) completion token counts |y|."""
        return self.loss_mask.sum(-1).float()


# ---------------------------------------------------------------- the next-token layout of PPO's batches

def response_matrix(rows: list[list[float]], width: int) -> torch.Tensor:
    """Per-response-token values (ragged rows) as a right-padded (B, width) float tensor."""
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def sequence_layout(sequences: list[tuple[list[int], list[int]]], pad_id: int,
                    sampled: list[list[int]] | None = None) -> tuple[torch.Tensor, ...]:
    """Right-padded (input_ids (B, T), attention_mask (B, T)) and, for moving per-response-token tensors
    (B, R) into the next-token layout (B, T-1), the column of each response token (B, R) and its mask:
    1 on response tokens, or with ``sampled`` (a multi-turn trajectory's loss mask per response) only
    on those it marks."""
    width = max(len(p) + len(r) for p, r in sequences)
    resp = max(len(r) for _, r in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(sequences), width, dtype=torch.long)
    column = torch.zeros(len(sequences), resp, dtype=torch.long)
    mask = torch.zeros(len(sequences), resp)
    for i, (p, r) in enumerate(sequences):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attn[i, : len(p) + len(r)] = 1
        column[i, : len(r)] = torch.arange(len(p) - 1, len(p) + len(r) - 1)
        mask[i, : len(r)] = 1.0 if sampled is None else torch.tensor(sampled[i], dtype=torch.float32)
    return ids, attn, column, mask


def to_next_token_layout(x: torch.Tensor, column: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, R) per response token → (B, width) with each token's value at its next-token column, 0 elsewhere."""
    out = torch.zeros(x.shape[0], width)
    return out.scatter_add_(1, column, x * mask)
