"""Versioned, bucketed, verified weight sync from the policy-trainer group to rollout workers.

Two transports, both bucketed:

- ``object_store``: the trainer returns its weights as ``num_returns`` bucket objects; each bucket's
  ref goes to every rollout worker as a top-level argument, so tensors move actor to actor and the
  driver never holds them.
- ``collective``: a broadcast group of trainer rank 0 and every rollout worker
  (``actors.weight_transport``), gloo on CPU and NCCL when the trainer has GPUs; one broadcast per
  bucket and dtype.

Either way a worker loads a version only when all of it arrived and the set of tensors is exactly
the checkpoint's (``RolloutWorker._load``), through vLLM's ``reload_weights``.

Verification: after a sync, the rollout engines' log-probs of a fixed probe batch must match the
trainer's own within a tolerance, or the sync fails loudly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from actors.modeling import token_logprobs
from actors.policy_trainer import PolicyTrainer
from actors.rollout import RolloutWorker, SyncError
from orchestrator.runtime.faults import FaultError
from orchestrator.runtime.sharding import sharded_rows
from pipelines.data.batches import SFTBatch

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import ActorGroup, Pending


def probe_token_logps(model, batch: SFTBatch) -> torch.Tensor:
    """(N, T-1) next-token log-probs, zeroed outside response tokens (picklable for ``evaluate``)."""
    lp = token_logprobs(model, batch.input_ids, batch.attention_mask)
    return lp * batch.loss_mask[:, 1:].to(lp.dtype)


def response_logprobs(group: ActorGroup, evaluate: Callable[..., Any], sequences: list[tuple[list[int], list[int]]],
                      pad_id: int, fn: Callable[[Any, SFTBatch], torch.Tensor] = probe_token_logps
                      ) -> list[list[float]]:
    """Per response token, the log-prob under a model group (policy trainer or reference), or with
    ``fn = masked_token_values`` a critic's value of the state that generates it.

    Rows are split into equal shards over the group's ranks (every rank runs the same number of
    forward passes, which ZeRO-3 needs).

    Args:
        group: a group whose ranks hold identical weights.
        evaluate: its ``evaluate(batch, fn)`` method (``PolicyTrainer.evaluate``, ``ReferenceModel.evaluate``).
        sequences: (prompt ids, response ids) pairs.
        fn: ``fn(model, batch) -> (N, T-1)``, column t for token t + 1, zero outside responses.
    """
    return submit_response_logprobs(group, evaluate, sequences, pad_id, fn).get()


@dataclass
class ResponseValues:
    """``response_logprobs`` submitted and not yet collected: ``get()`` waits (within the group's
    deadline) and returns the per-response-token rows."""

    pending: Pending
    shards: list[list[tuple[list[int], list[int]]]]
    rows: int

    def get(self) -> list[list[float]]:
        out = [row for shard, values in zip(self.shards, self.pending.get(), strict=True)
               for row in _response_rows(shard, values)]
        return out[: self.rows]


def submit_response_logprobs(group: ActorGroup, evaluate: Callable[..., Any],
                             sequences: list[tuple[list[int], list[int]]], pad_id: int,
                             fn: Callable[[Any, SFTBatch], torch.Tensor] = probe_token_logps) -> ResponseValues:
    """``response_logprobs`` without waiting: other groups work meanwhile (the reference, the policy
    and the critic score the same samples concurrently)."""
    shards, _ = sharded_rows(list(sequences), group.num_workers)
    return ResponseValues(group.shard_async(evaluate, [_probe_batch(s, pad_id) for s in shards], fn), shards,
                          len(sequences))


def _probe_batch(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> SFTBatch:
    width = max(len(p) + len(r) for p, r in sequences)
    ids = [p + r + [pad_id] * (width - len(p) - len(r)) for p, r in sequences]
    attn = [[1] * (len(p) + len(r)) + [0] * (width - len(p) - len(r)) for p, r in sequences]
    mask = [[0] * len(p) + [1] * len(r) + [0] * (width - len(p) - len(r)) for p, r in sequences]
    return SFTBatch(torch.tensor(ids), torch.tensor(attn), torch.tensor(mask))


def _response_rows(sequences: list[tuple[list[int], list[int]]], lps: torch.Tensor) -> list[list[float]]:
    return [lps[i, len(p) - 1 : len(p) + len(r) - 1].tolist() for i, (p, r) in enumerate(sequences)]


@dataclass
class WeightSync:
    """Pushes trainer weights to every rollout worker and checks what they serve.

    Its state: ``version``, the version every rollout worker serves, and ``trainer_ahead``, set while
    the trainer updates past it (``updating``), when the trainer no longer holds the served weights.
    A rollout rank replaced meanwhile serves the starting checkpoint (version 0) until the next push;
    the samples it draws carry that version, so the rollout queue sees the batch is not whole and
    generates it again after the push (``rollout_queue.RolloutQueue.settle``).
    """

    trainer: ActorGroup
    rollout: ActorGroup
    pad_id: int
    bucket_bytes: int = 64 * 2**20
    tolerance: float = 1e-3
    transport: str = "object_store"
    version: int = 0
    plan: list[list[str]] = field(default_factory=list)
    probe: list[tuple[list[int], list[int]]] = field(default_factory=list)  # the last verified probe
    _meta: list[list[Any]] = field(default_factory=list)
    _pushing: bool = False
    _exported: list[Any] | None = None  # bucket refs of the trainer's weights, exported ahead of the push
    trainer_ahead: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)  # catch-ups against the start of an update

    def __post_init__(self) -> None:
        self.rollout.on_replace.append(self.catch_up)

    def push(self) -> dict[str, float]:
        """Send the trainer's current weights as version ``self.version + 1``; returns sync metrics.
        A push during which a rollout worker was replaced is sent again whole."""
        start = time.perf_counter()
        if not self.plan:
            self.plan = self.trainer.rank0(PolicyTrainer.bucket_plan, self.bucket_bytes)
        version = self.version + 1
        if self.transport not in ("collective", "object_store"):
            raise ValueError(f"unknown weight-sync transport {self.transport!r} (object_store or collective)")
        self._pushing = True
        try:
            while True:
                replaced = len(self.rollout.faults.events)
                results = (self._push_collective(version) if self.transport == "collective"
                           else self._push_buckets(version, list(range(self.rollout.num_workers))))
                if len(self.rollout.faults.events) == replaced:
                    break
        finally:
            self._pushing = False
        served = [r.get("version") for r in results]  # each rank's answer to its last bucket: what it loaded
        if any(v != version for v in served):
            raise SyncError(f"after sync to version {version} the rollout workers serve versions {served}")
        self.version = version
        self.trainer_ahead = False
        return {
            "timing/sync_weights_s": time.perf_counter() - start,
            "sync/bytes": float(results[0]["bytes"]),
            "sync/buckets": float(len(self.plan)),
            "sync/version": float(version),
        }

    def export(self) -> None:
        """Start packing the trainer's weights into bucket objects now (object-store transport), so the
        trainer does it while the rollout engines still generate; the next ``push`` sends them. Call
        only after the update, when the trainer's weights are those the push sends."""
        if self.transport == "object_store":
            if not self.plan:
                self.plan = self.trainer.rank0(PolicyTrainer.bucket_plan, self.bucket_bytes)
            self._exported = self.trainer.broadcast_refs(PolicyTrainer.weight_buckets, len(self.plan), self.plan)[0]

    def drop_export(self) -> None:
        """Forget weights exported ahead (a rollback: they are not the weights to serve)."""
        self._exported = None

    def _push_buckets(self, version: int, ranks: list[int]) -> list[dict[str, Any]]:
        """The object-store transport: the trainer's weights as bucket objects (exported ahead, or
        now), each sent to ``ranks``."""
        refs, self._exported = self._exported, None
        if refs is None:
            refs = self.trainer.broadcast_refs(PolicyTrainer.weight_buckets, len(self.plan), self.plan)[0]
        return self.rollout.on_ranks(ranks, RolloutWorker.receive_buckets, version, *refs)  # one call per rank

    def updating(self, moving: bool) -> None:
        """Mark that the trainer's weights move past the served version (an update starts), or that
        they did not after all (nothing was trained); ``push`` clears it."""
        with self.lock:  # a catch-up under way exports the served weights before the update starts
            self.trainer_ahead = moving

    def catch_up(self, group: ActorGroup, rank: int) -> None:
        """A replaced rollout worker loaded the starting checkpoint: push it the served version (the
        trainer's weights since the last push) and check its log-probs before it serves again; while
        the trainer is ahead of the served version it cannot: the rank serves the starting checkpoint
        until the next push."""
        if self.version == 0 or self._pushing:
            return  # it already serves version 0; or the push under way is sent again whole
        if self.transport == "collective":
            raise FaultError(f"rollout rank {rank} was replaced, and the collective weight-sync transport cannot "
                             "admit a new member into its group: use rollout.weight_sync.transport: object_store")
        with self.lock:
            if self.trainer_ahead:  # asynchronous rollouts: the trainer no longer holds the served version
                return
            self._push_buckets(self.version, [rank])
            if self.probe:
                self.verify(self.probe)

    def _push_collective(self, version: int) -> list[dict[str, Any]]:

        if not self._meta:  # first push: open the group (all members at once: the rendezvous blocks)
            backend = "nccl" if self.trainer.resources.num_gpus else "gloo"
            world = 1 + self.rollout.num_workers
            host, port = self.trainer.rank0(PolicyTrainer.open_rendezvous, world)
            self.trainer.get([r for group, method in ((self.trainer, PolicyTrainer.open_weight_group),
                                                      (self.rollout, RolloutWorker.open_weight_group))
                              for (r,) in group.broadcast_refs(method, 1, backend, host, port, world)])
            self._meta = self.trainer.rank0(PolicyTrainer.bucket_meta, self.plan)
        sends = [r for (r,) in self.trainer.broadcast_refs(PolicyTrainer.broadcast_weights, 1, self.plan)]
        receives = [r for (r,) in self.rollout.broadcast_refs(RolloutWorker.receive_broadcast, 1, version, self._meta)]
        self.trainer.get(sends)
        return self.rollout.get(receives)

    def verify(self, probe: list[tuple[list[int], list[int]]]) -> dict[str, float]:
        """Max |rollout − trainer| log-prob over the probe's response tokens, on every worker."""
        self.probe = probe
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
