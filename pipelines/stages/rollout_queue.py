"""Asynchronous rollouts: generation batches of coming iterations run on the rollout workers while
the trainer learns from the current one (``rollout.max_staleness: k``, k ≥ 1).

The queue keeps the batches of iterations ``it .. it + k`` submitted; one driver thread runs them
on the workers one after another, in iteration order. Before a weight push the loop settles the
queue: every batch in flight finishes first, so a push happens between generation batches and no
batch mixes two weight versions (the batch-boundary choice; vLLM's pause/abort would cut a batch in
two versions). A batch submitted at the start of iteration ``i`` is sampled by the weights pushed
after iteration ``i - 1``, so the batch trained in iteration ``j`` is at most k versions behind the
trainer: its staleness is ``trainer version − sample.policy_version`` ≤ k.

Exactly once: the finished batches waiting in the queue go into each in-stage checkpoint (their
samples, versions and log-probs) and come back on resume, so a resumed stage trains on the same
samples as an uninterrupted one. After a trainer rank is lost the batches in flight are dropped
(they came from versions the rollback discards) and the checkpoint's are restored. A rollout rank
replaced while the trainer is ahead of the served version cannot be caught up to that version: it
serves the starting checkpoint until the next push (the weight sync's ``behind``), so its samples
carry another version than their batch's; ``settle`` drops such a batch and it is generated again
after the push.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from actors.rollout import RolloutSample
from orchestrator.runtime import faults

if TYPE_CHECKING:
    from pipelines.stages.timeline import ScoredAlready, ScoreStream


@dataclass
class Batch:
    """One iteration's samples, and when they were generated (perf_counter); ``scores``: their
    scoring, started while they generated (a ``ScoreStream``), or None (a restored batch);
    ``prompts``: the prompt indices sampled when they are not the iteration's own (dynamic sampling),
    with ``metrics`` of how they were found; ``version``: the weights served when it started (None:
    not known, a restored batch)."""

    samples: list[RolloutSample]
    start: float
    end: float
    scores: ScoreStream | ScoredAlready | None = None
    prompts: list[int] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    version: int | None = None

    def whole(self) -> bool:
        """Whether every sample was drawn from the version served when the batch started (a rank
        replaced meanwhile may have served the starting checkpoint instead)."""
        return self.version is None or all(s.policy_version == self.version for s in self.samples)


Generated = tuple[list[RolloutSample], "ScoreStream | ScoredAlready | None", "list[int] | None", dict[str, float]]


class RolloutQueue:
    """Generation batches ahead of the trainer, at most ``depth`` (= max_staleness) beyond the current
    iteration; ``generate(iteration)`` samples an iteration's prompts on the rollout workers and returns
    (samples, their scoring started meanwhile or None, the prompts sampled when not the iteration's
    own, metrics). With
    ``depth`` 0 (the synchronous loop) each batch is generated in ``take``, on the driver's thread."""

    def __init__(self, generate: Callable[[int], Generated], depth: int, last: int,
                 served: Callable[[], int] = lambda: 0) -> None:
        """``served()``: the weight version the rollout workers serve now."""
        self.generate, self.depth, self.last, self.served = generate, depth, last, served
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead") if depth else None
        self.ahead: dict[int, Future[Batch]] = {}

    def _run(self, iteration: int) -> Batch:
        with faults.at(iteration=iteration, phase="rollout"):
            start, version = time.perf_counter(), self.served()
            samples, scores, prompts, metrics = self.generate(iteration)
            return Batch(samples, start, time.perf_counter(), scores, prompts, metrics, version)

    def fill(self, iteration: int) -> None:
        """Submit the batches of ``iteration .. iteration + depth`` not yet queued (up to the last)."""
        for j in range(iteration, min(iteration + self.depth, self.last) + 1):
            if j not in self.ahead and self.pool is not None:
                self.ahead[j] = self.pool.submit(self._run, j)

    def take(self, iteration: int) -> tuple[Batch, float]:
        """The iteration's batch (waiting for it) and the seconds waited."""
        start = time.perf_counter()
        self.fill(iteration)
        batch = self.ahead.pop(iteration).result() if iteration in self.ahead else self._run(iteration)
        return batch, time.perf_counter() - start

    def settle(self) -> list[int]:
        """Wait for every batch in flight (before a weight push); drop those not drawn whole from the
        version they started on (a replaced rank served the starting checkpoint: they are generated
        again after the push) and return their iterations."""
        dropped = [j for j, future in sorted(self.ahead.items()) if not future.result().whole()]
        for j in dropped:
            del self.ahead[j]
        return dropped

    def drop_all(self) -> None:
        """Wait for the batches in flight and forget every queued batch (a rollback)."""
        for future in self.ahead.values():
            try:
                future.result()
            except Exception:  # noqa: BLE001 - the batch is discarded either way
                pass
        self.ahead.clear()

    def state(self) -> list[dict[str, Any]]:
        """The finished batches waiting in the queue (call after ``settle``), as JSON for a checkpoint."""
        # with the sampler's metrics (a trajectory batch's env/*: logged when the batch is trained on)
        return [{"iteration": j, "samples": [asdict(s) for s in future.result().samples],
                 "metrics": future.result().metrics} for j, future in sorted(self.ahead.items())]

    def restore(self, saved: list[dict[str, Any]]) -> None:
        """Put a checkpoint's waiting batches back in the queue."""
        self.drop_all()
        for entry in saved:
            future: Future[Batch] = Future()
            now = time.perf_counter()
            future.set_result(Batch([RolloutSample(**s) for s in entry["samples"]], now, now,
                                    metrics=dict(entry.get("metrics", {}))))
            self.ahead[int(entry["iteration"])] = future

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
