"""A reward served once: a Ray Serve application (``rlhf serve --reward-model … --reward-name NAME``)
that stages call by name (``reward: {served: NAME}``) instead of starting a reward role of their own.

Any number of stages and pipelines on the cluster share its replicas (Serve's own config scales them:
``num_replicas``, or ``autoscaling_config`` with ``--reward-autoscale MIN:MAX``). The calls keep the
stage's error policy (``fault_tolerance``): every chunk has the call deadline, and a chunk whose
replica died or was unavailable is sent again (Serve's controller replaces the replica) up to
``max_restarts`` times in all before the stage stops with a ``FaultError`` naming the application,
the phase and the iteration. The calls, their latency and the retries are counted per iteration
(``served/*``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator.runtime import faults
from orchestrator.runtime.calls import CALLS
from pipelines.errors import ConfigError, RewardError


@dataclass
class ServedReward:
    """The client of one served reward application."""

    name: str
    policy: faults.FaultPolicy
    retries: int = 0  # chunks sent again in this stage
    stats: dict[str, float] = field(default_factory=lambda: {"calls": 0.0, "latency_s": 0.0, "latency_max_s": 0.0,
                                                             "retries": 0.0})

    def check(self) -> dict[str, Any]:
        """The application must run on this cluster (checked before the stage's actors start)."""
        from ray import serve

        try:
            apps = serve.status().applications
        except Exception as exc:  # no Serve controller on this cluster
            raise ConfigError(f"reward.served: {self.name!r}: no Ray Serve on this cluster ({exc}); start it with "
                              f"rlhf serve --reward-model CHECKPOINT --reward-name {self.name}") from None
        status = apps.get(self.name)
        if status is None or status.status != "RUNNING":
            running = sorted(n for n, s in apps.items() if s.status == "RUNNING")
            state = "not deployed" if status is None else f"{status.status}: {status.message}"
            raise ConfigError(f"reward.served: the Serve application {self.name!r} is {state} (running: "
                              f"{running or 'none'}); start it with rlhf serve --reward-model CHECKPOINT "
                              f"--reward-name {self.name}")
        return {"application": self.name, "status": status.status}

    def score(self, prompts: list[Any], responses: list[str], items_per_chunk: int) -> list[list[float]]:
        """One row [score] per (prompt, response), the chunks scored concurrently by the replicas."""
        from ray import serve

        handle = serve.get_app_handle(self.name)
        chunks = [(list(prompts[i : i + items_per_chunk]), list(responses[i : i + items_per_chunk]))
                  for i in range(0, len(prompts), items_per_chunk)]
        sent = [(time.perf_counter(), handle.score.remote(*chunk)) for chunk in chunks]
        CALLS.add("reward", len(sent))
        rows: list[list[float]] = []
        for chunk, (start, response) in zip(chunks, sent, strict=True):
            rows.extend([s] for s in self._result(handle, chunk, start, response))
        return rows

    def _result(self, handle: Any, chunk: tuple[list[Any], list[str]], start: float, response: Any) -> list[float]:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        lost = (RayActorError, TimeoutError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)
        while True:
            try:
                scores = response.result(timeout_s=self.policy.call_timeout_s)
                break
            except lost as exc:
                if self.retries >= self.policy.max_restarts:
                    where = faults.describe_where(faults.where())
                    raise faults.FaultError(
                        f"reward (served {self.name!r}): a call failed after {self.retries} retries in this stage "
                        f"({where}; {type(exc).__name__}: {exc}); the stage's last checkpoint is kept") from None
                self.retries += 1
                self.stats["retries"] += 1
                start, response = time.perf_counter(), handle.score.remote(*chunk)
                CALLS.add("reward", 1)
            except RewardError:
                raise
            except Exception as exc:  # the reward itself failed on this input: not a fault to retry
                raise RewardError(f"reward (served {self.name!r}): {type(exc).__name__}: {exc}") from None
        latency = time.perf_counter() - start
        self.stats["calls"] += 1
        self.stats["latency_s"] += latency
        self.stats["latency_max_s"] = max(self.stats["latency_max_s"], latency)
        if len(scores) != len(chunk[0]):
            raise RewardError(f"reward (served {self.name!r}): {len(scores)} scores for {len(chunk[0])} items")
        return [float(s) for s in scores]

    def take_stats(self) -> dict[str, float]:
        """``served/calls``, ``served/latency_s_mean``, ``served/latency_max_s``, ``served/retries``
        since the last call."""
        s, self.stats = self.stats, {k: 0.0 for k in self.stats}
        mean = s["latency_s"] / s["calls"] if s["calls"] else 0.0
        return {"served/calls": s["calls"], "served/latency_s_mean": mean, "served/latency_max_s": s["latency_max_s"],
                "served/retries": s["retries"]}
