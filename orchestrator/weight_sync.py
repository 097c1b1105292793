"""Versioned, bucketed, verified weight sync from the policy-trainer group to rollout workers.

Transport here: the Ray object store. The trainer returns its weights as ``num_returns`` bucket
objects; each bucket's ref goes to every rollout worker as a top-level argument, so tensors move
actor to actor and the driver never holds them. Each worker loads a version only when all its buckets
arrived and the set of tensors is exactly the checkpoint's (``RolloutWorker.receive_bucket``).

Verification: after a sync, the rollout engines' log-probs of a fixed probe batch must match the
trainer's own within a tolerance, or the sync fails loudly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from actors.batches import SFTBatch
from actors.modeling import token_logprobs
from actors.policy_trainer import PolicyTrainer
from actors.rollout import RolloutWorker, SyncError
from orchestrator.actor_group import ActorGroup


def probe_token_logps(model, batch: SFTBatch) -> torch.Tensor:
    """(N, T-1) next-token log-probs, zeroed outside response tokens (picklable for ``evaluate``)."""
    lp = token_logprobs(model, batch.input_ids, batch.attention_mask)
    return lp * batch.loss_mask[:, 1:].to(lp.dtype)


def trainer_logprobs(trainer: ActorGroup, sequences: list[tuple[list[int], list[int]]], pad_id: int) -> list[list[float]]:
    """Per response token, the trainer's log-prob (rank 0; all ranks hold the same weights)."""
    width = max(len(p) + len(r) for p, r in sequences)
    ids = [p + r + [pad_id] * (width - len(p) - len(r)) for p, r in sequences]
    attn = [[1] * (len(p) + len(r)) + [0] * (width - len(p) - len(r)) for p, r in sequences]
    mask = [[0] * len(p) + [1] * len(r) + [0] * (width - len(p) - len(r)) for p, r in sequences]
    batch = SFTBatch(torch.tensor(ids), torch.tensor(attn), torch.tensor(mask))
    out = trainer.rank0(PolicyTrainer.evaluate, batch, probe_token_logps)
    return [out[i, len(p) - 1 : len(p) + len(r) - 1].tolist() for i, (p, r) in enumerate(sequences)]


@dataclass
class WeightSync:
    """Pushes trainer weights to every rollout worker and checks what they serve."""

    trainer: ActorGroup
    rollout: ActorGroup
    pad_id: int
    bucket_bytes: int = 64 * 2**20
    tolerance: float = 1e-3
    version: int = 0
    plan: list[list[str]] = field(default_factory=list)

    def push(self) -> dict[str, float]:
        """Send the trainer's current weights as version ``self.version + 1``; returns sync metrics."""
        start = time.perf_counter()
        if not self.plan:
            self.plan = self.trainer.rank0(PolicyTrainer.bucket_plan, self.bucket_bytes)
        version = self.version + 1
        refs = self.trainer.broadcast_refs(PolicyTrainer.weight_buckets, len(self.plan), self.plan)[0]
        results = []
        for index, ref in enumerate(refs):
            results = self.rollout.broadcast(RolloutWorker.receive_bucket, version, index, len(refs), ref)
        served = self.rollout.broadcast(RolloutWorker.served_version)
        if any(v != version for v in served):
            raise SyncError(f"after sync to version {version} the rollout workers serve versions {served}")
        self.version = version
        return {
            "timing/sync_weights_s": time.perf_counter() - start,
            "sync/bytes": float(results[0]["bytes"]),
            "sync/buckets": float(len(refs)),
            "sync/version": float(version),
        }

    def verify(self, probe: list[tuple[list[int], list[int]]]) -> dict[str, float]:
        """Max |rollout − trainer| log-prob over the probe's response tokens, on every worker."""
        reference = trainer_logprobs(self.trainer, probe, self.pad_id)
        worst = 0.0
        for rank, served in enumerate(self.rollout.broadcast(RolloutWorker.token_logprobs, probe)):
            for want, got in zip(reference, served, strict=True):
                gap = max((abs(a - b) for a, b in zip(want, got, strict=True)), default=0.0)
                worst = max(worst, gap)
                if gap > self.tolerance:
                    raise SyncError(
                        f"rollout worker {rank} at version {self.version}: log-probs differ from the trainer's "
                        f"by {gap:.3g} > tolerance {self.tolerance:g}"
                    )
        return {"sync/logprob_max_abs_diff": worst}
