"""Resource units of the placement plan (no Ray import: stages and the plan use these freely)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerResources:
    """Resources of one rank (one Ray actor, one placement-group bundle)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.num_cpus}
        if self.num_gpus:
            bundle["GPU"] = self.num_gpus
        return bundle
