"""Preference pairs as the DPO-family stages (``offline_dpo``, ``onpolicy_dpo``) train on them:
tokenized pairs with their reference log-probs, the policy's log-probs of pairs over a group, the
configured loss, and the held-out metrics computed with that same loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from actors.modeling import preference_logps
from orchestrator.runtime.sharding import sharded_rows
from pipelines.data.batches import PreferenceBatch
from pipelines.data.formats import pair_texts, read_pairs
from pipelines.data.lengths import LengthTally
from pipelines.data.tokens import TokenizedPair, collate_pairs, tokenize_pairs
from pipelines.losses import DPOLoss, UPOLoss
from pipelines.stages.auxiliary import AuxiliaryObjective, AuxiliaryTerm
from pipelines.stages.config import DPOConfig

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import ActorGroup


@dataclass
class PairSet:
    """Tokenized pairs (a list, or a memory-mapped ``PairStore``) with their cached reference
    log-probs, each (N,) (None for a reference-free loss), and with UPO the auxiliary rewards and
    weights of both sides."""

    pairs: Sequence[TokenizedPair]
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    aux: AuxiliaryTerm | None = None

    def batch(self, idx: list[int], pad_id: int) -> PreferenceBatch:
        refs = (None, None)
        if self.ref_chosen is not None and self.ref_rejected is not None:
            refs = (self.ref_chosen[idx], self.ref_rejected[idx])
        batch = collate_pairs([self.pairs[i] for i in idx], pad_id, *refs)
        return self.aux.attach(batch, idx) if self.aux is not None else batch


def load_pair_texts(path: str, tokenizer, columns: dict[str, str], cap: int | None = None) -> dict[str, list[str]]:
    """A pair file's rows (any pair format) as ``formats.pair_texts``: rendered and plain texts."""
    return pair_texts(read_pairs(path, columns, limit=cap), tokenizer, path)


def load_pairs(path: str, tokenizer, lengths: LengthTally, cap: int | None = None,
               columns: dict[str, str] | None = None, texts: dict[str, list[str]] | None = None
               ) -> list[TokenizedPair]:
    """Tokenized pairs of a pair file (or of its ``texts``, already read) under the length policy of
    ``lengths`` (finished here); ``kept_texts`` aligns the texts with the pairs kept."""
    texts = texts if texts is not None else load_pair_texts(path, tokenizer, columns or {}, cap)
    pairs = tokenize_pairs(texts, tokenizer, lengths=lengths, source=path)
    lengths.finish()
    return pairs


def kept_texts(texts: dict[str, list[str]], rows: Sequence[int]) -> dict[str, list[str]]:
    """The texts of the rows the length policy kept (``TokenizedPair.row``, ``PairStore.rows``)."""
    return {k: [column[r] for r in rows] for k, column in texts.items()}


# Pairs per pass of the group: a block, not the whole dataset, is collated and shipped at a time.
PAIRS_PER_PASS = 4096


def sharded_logps(group: ActorGroup, method, pairs: Sequence[TokenizedPair], pad_id: int):
    """(chosen (N,), rejected (N,)) log-probs, rows split across the group's ranks (padded to divide),
    ``PAIRS_PER_PASS`` pairs at a time (``pairs`` may be a ``PairStore``)."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), PAIRS_PER_PASS):
        block = pairs[start : start + PAIRS_PER_PASS]
        shards, _ = sharded_rows(block, group.num_workers)
        results = group.shard(method, [collate_pairs(shard, pad_id) for shard in shards], preference_logps)
        chosen.append(torch.cat([c for c, _ in results])[: len(block)])
        rejected.append(torch.cat([r for _, r in results])[: len(block)])
    return torch.cat(chosen), torch.cat(rejected)


def dpo_loss_of(d: DPOConfig) -> DPOLoss:
    """The DPO-family loss as ``dpo:`` configures it (type, β, label smoothing, RPO, SimPO's γ, ORPO's λ)."""
    return DPOLoss(d.beta, d.loss_type, d.label_smoothing, d.rpo_alpha, d.simpo_gamma, d.orpo_lambda)


def training_loss(d: DPOConfig, objective: AuxiliaryObjective | None) -> DPOLoss | UPOLoss:
    """The loss the trainer steps on: the DPO-family loss, wrapped by UPO's auxiliary term when the
    stage has auxiliary rewards."""
    loss = dpo_loss_of(d)
    if objective is None:
        return loss
    return UPOLoss(loss, objective.upo.coef, objective.names, objective.upo.responses == "preferred")


def held_out_metrics(loss: DPOLoss, held_out: PairSet, chosen: torch.Tensor, rejected: torch.Tensor
                     ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """``eval/*`` metrics of the policy's summed log-probs of the held-out pairs, each (N,), with the
    stage's own loss (``eval/loss`` is the configured ``loss_type``, RPO term included), and the
    implicit rewards of both sides, each (N,)."""
    lengths = [torch.tensor([float(len(getattr(p, side))) for p in held_out.pairs]) for side in ("chosen", "rejected")]
    _, metrics, chosen_rewards, rejected_rewards = loss.from_logps(chosen, rejected, held_out.ref_chosen,
                                                                   held_out.ref_rejected, *lengths)
    return {f"eval/{k}": float(v) for k, v in metrics.items()}, chosen_rewards, rejected_rewards
