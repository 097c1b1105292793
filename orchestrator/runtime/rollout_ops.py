"""Driver-side operations over the online roles: generate, score, and the train–inference gap."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from actors.policy_trainer import PolicyTrainer
from actors.reward import RewardWorker
from actors.rollout import RolloutSample, RolloutWorker, SamplingSpec
from orchestrator.runtime.weight_sync import response_logprobs
from pipelines.data.rewards import FunctionReward

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import ActorGroup


def generate(rollout: ActorGroup, prompts: list[list[int]], sampling: SamplingSpec, prompts_per_chunk: int = 16,
             on_chunk: Callable[[int, list[RolloutSample]], None] | None = None) -> list[RolloutSample]:
    """Generate over all rollout workers: chunks go to whichever worker has the least pending work.

    Returns ``sampling.n`` samples per prompt, grouped by prompt, in prompt order. With a seed, each
    prompt's samples depend only on the seed and the prompt's position, not on the dispatch.
    ``on_chunk(i, samples)`` gets each chunk's samples as they arrive (chunk i: prompts from
    ``i * prompts_per_chunk``), while the other chunks are still generating.
    """
    chunks = [(prompts[i : i + prompts_per_chunk], i) for i in range(0, len(prompts), prompts_per_chunk)]
    results = rollout.balanced(RolloutWorker.generate_chunk, chunks, sampling, on_result=on_chunk)
    return [s for chunk in results for s in chunk]


def generate_scored(rollout: ActorGroup, prompts: list[list[int]], fields: list[Any], sampling: SamplingSpec,
                    reward: FunctionReward) -> list[RolloutSample]:
    """``generate`` with each sample scored by a function reward inside its rollout worker
    (``sample.reward``), in one call per worker (its share of the prompts)."""
    per = max(1, -(-len(prompts) // rollout.num_workers))
    chunks = [(prompts[i : i + per], i, fields[i : i + per]) for i in range(0, len(prompts), per)]
    results = rollout.balanced(RolloutWorker.generate_scored, chunks, sampling, reward)
    return [s for chunk in results for s in chunk]


def score(reward: ActorGroup, prompts: list[str], responses: list[str], items_per_chunk: int = 64, *,
          method: Callable[..., list[Any]] = RewardWorker.score_chunk) -> list[Any]:
    """One reward per (prompt, response), scored in chunks over the reward group's ranks (with
    ``RewardSet.score_chunk`` as ``method``: one list of scores per item)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    starts = range(0, len(prompts), items_per_chunk)
    chunks = [(prompts[i : i + items_per_chunk], responses[i : i + items_per_chunk]) for i in starts]
    results = reward.balanced(method, chunks)
    return [s for chunk in results for s in chunk]


def logprob_gap(trainer: ActorGroup, samples: list[RolloutSample], pad_id: int) -> dict[str, float]:
    """``rollout/logprob_gap``: mean |rollout − trainer| log-prob over the sampled tokens (and the max)."""
    kept = [s for s in samples if s.response_ids]
    if not kept:
        return {"rollout/logprob_gap": 0.0, "rollout/logprob_gap_max": 0.0}
    sequences = [(s.prompt_ids, s.response_ids) for s in kept]
    trainer_lp = response_logprobs(trainer, PolicyTrainer.evaluate, sequences, pad_id)
    return gap_metrics(kept, trainer_lp)


def gap_metrics(samples: list[RolloutSample], trainer_logprobs: list[list[float]]) -> dict[str, float]:
    """Mean and max |rollout − trainer| log-prob over the sampled tokens, given the trainer's per-token log-probs."""
    gaps = [abs(a - b) for s, lp in zip(samples, trainer_logprobs, strict=True)
            for a, b, sampled in zip(s.logprobs, lp, s.sampled_mask(), strict=True) if sampled]
    return {"rollout/logprob_gap": sum(gaps) / max(1, len(gaps)), "rollout/logprob_gap_max": max(gaps, default=0.0)}
