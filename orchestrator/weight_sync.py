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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from actors.batches import SFTBatch
from actors.modeling import token_logprobs
from actors.policy_trainer import PolicyTrainer
from actors.rollout import RolloutSample, RolloutWorker, SamplingSpec, SyncError
from orchestrator.actor_group import ActorGroup


def probe_token_logps(model, batch: SFTBatch) -> torch.Tensor:
    """(N, T-1) next-token log-probs, zeroed outside response tokens (picklable for ``evaluate``)."""
    lp = token_logprobs(model, batch.input_ids, batch.attention_mask)
    return lp * batch.loss_mask[:, 1:].to(lp.dtype)


def response_logprobs(group: ActorGroup, evaluate: Callable[..., Any], sequences: list[tuple[list[int], list[int]]],
                      pad_id: int) -> list[list[float]]:
    """Per response token, the log-prob under a model group's rank 0 (policy trainer or reference).

    Args:
        group: a group whose ranks hold identical weights.
        evaluate: its ``evaluate(batch, fn)`` method (``PolicyTrainer.evaluate``, ``ReferenceModel.evaluate``).
        sequences: (prompt ids, response ids) pairs.
    """
    width = max(len(p) + len(r) for p, r in sequences)
    ids = [p + r + [pad_id] * (width - len(p) - len(r)) for p, r in sequences]
    attn = [[1] * (len(p) + len(r)) + [0] * (width - len(p) - len(r)) for p, r in sequences]
    mask = [[0] * len(p) + [1] * len(r) + [0] * (width - len(p) - len(r)) for p, r in sequences]
    batch = SFTBatch(torch.tensor(ids), torch.tensor(attn), torch.tensor(mask))
    out = group.rank0(evaluate, batch, probe_token_logps)
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
        reference = response_logprobs(self.trainer, PolicyTrainer.evaluate, probe, self.pad_id)
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


def generate(rollout: ActorGroup, prompts: list[list[int]], sampling: SamplingSpec,
             prompts_per_chunk: int = 16) -> list[RolloutSample]:
    """Generate over all rollout workers: chunks go to whichever worker has the least pending work."""
    chunks = [prompts[i : i + prompts_per_chunk] for i in range(0, len(prompts), prompts_per_chunk)]
    return [s for chunk in rollout.balanced(RolloutWorker.generate, chunks, sampling) for s in chunk]


def logprob_gap(trainer: ActorGroup, samples: list[RolloutSample], pad_id: int) -> dict[str, float]:
    """``rollout/logprob_gap``: mean |rollout − trainer| log-prob over the sampled tokens (and the max)."""
    kept = [s for s in samples if s.response_ids]
    if not kept:
        return {"rollout/logprob_gap": 0.0, "rollout/logprob_gap_max": 0.0}
    trainer_lp = response_logprobs(trainer, PolicyTrainer.evaluate, [(s.prompt_ids, s.response_ids) for s in kept], pad_id)
    gaps = [abs(a - b) for s, lp in zip(kept, trainer_lp, strict=True) for a, b in zip(s.logprobs, lp, strict=True)]
    return {"rollout/logprob_gap": sum(gaps) / len(gaps), "rollout/logprob_gap_max": max(gaps)}
