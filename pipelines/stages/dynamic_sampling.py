"""DAPO's dynamic sampling for the online loop (``sampling.dynamic``; Yu et al. 2025, §3.2).

A prompt whose K samples all get the same reward contributes nothing to a group-baseline policy
gradient (every advantage is 0) yet still counts in the batch. Each round here generates and scores a
set of prompts, keeps the groups whose rewards differ (``ppo.informative_groups``) and, while fewer
than the iteration's prompts are kept, samples more prompts, not yet tried this iteration, sized by
the keep rate seen so far; after ``max_rounds`` rounds a batch still short is filled with dropped
groups, so the trainer's batch size never changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from actors.rollout import RolloutSample
from pipelines.algorithms.ppo import informative_groups


@dataclass
class Round:
    """One round's groups: ``prompts`` (P,), their samples (P·K, grouped by prompt), the stage reward
    of each sample and the (P·K, A) auxiliary scores (or None)."""

    prompts: list[int]
    samples: list[RolloutSample]
    rewards: list[float]
    aux: torch.Tensor | None


@dataclass
class Filled:
    """The iteration's batch: exactly the wanted number of groups, and the ``dynamic/*`` metrics."""

    prompts: list[int]
    samples: list[RolloutSample]
    rewards: list[float]
    aux: torch.Tensor | None
    metrics: dict[str, float]


def _groups(r: Round, k: int) -> list[tuple[int, list[RolloutSample], list[float], torch.Tensor | None]]:
    return [(p, r.samples[i * k : (i + 1) * k], r.rewards[i * k : (i + 1) * k],
             None if r.aux is None else r.aux[i * k : (i + 1) * k]) for i, p in enumerate(r.prompts)]


def fill_groups(generate: Callable[[list[int], int], Round], chosen: list[int], *, k: int, num_prompts: int,
                max_rounds: int, generator: torch.Generator) -> Filled:
    """Rounds of ``generate(prompt indices, round)`` (round 0 on ``chosen``) until ``len(chosen)``
    informative groups are kept or ``max_rounds`` have run; more prompts are drawn with ``generator``
    from the ``num_prompts`` not yet tried. Groups keep the order they were generated in.

    Metrics: ``dynamic/drop_rate`` (share of generated groups dropped), ``dynamic/rounds``,
    ``dynamic/groups_generated``, ``dynamic/filled_with_dropped`` (dropped groups that filled a short batch).
    """
    want = len(chosen)
    kept: list = []
    dropped: list = []
    tried = set(chosen)
    todo = list(chosen)
    rounds = 0
    while todo:
        groups = _groups(generate(todo, rounds), k)
        rounds += 1
        keep = informative_groups(torch.tensor([r for g in groups for r in g[2]], dtype=torch.float64), k).tolist()
        kept += [g for g, ok in zip(groups, keep, strict=True) if ok]
        dropped += [g for g, ok in zip(groups, keep, strict=True) if not ok]
        short = want - len(kept)
        if short <= 0 or rounds >= max_rounds:
            break
        rate = len(kept) / (len(kept) + len(dropped))
        fresh = [i for i in torch.randperm(num_prompts, generator=generator).tolist() if i not in tried]
        todo = fresh[: min(len(fresh), math.ceil(short / max(rate, 0.25)))]  # at most 4x the shortfall
        tried.update(todo)
    generated = len(kept) + len(dropped)
    filled = max(0, want - len(kept))
    batch = kept[:want] + dropped[:filled]
    aux = None if batch[0][3] is None else torch.cat([g[3] for g in batch])
    metrics = {"dynamic/drop_rate": len(dropped) / generated, "dynamic/rounds": float(rounds),
               "dynamic/groups_generated": float(generated), "dynamic/filled_with_dropped": float(filled)}
    return Filled([g[0] for g in batch], [s for g in batch for s in g[1]], [r for g in batch for r in g[2]], aux,
                  metrics)
