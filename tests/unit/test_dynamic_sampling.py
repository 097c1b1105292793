"""DAPO's dynamic sampling: the batch is refilled with informative groups, by bounded rounds.

A scripted ``generate`` stands in for the rollout workers and reward: what is tested is the round
logic (which prompts are tried, what is kept, how a short batch is filled); the real rollout path
runs in tests/e2e (the shipped DAPO pipeline)."""

import torch

from actors.rollout import RolloutSample
from pipelines.stages.dynamic_sampling import Round, fill_groups

K = 2


def _scripted(informative: set[int]):
    """Prompt p's K samples get rewards [1, 0] when p is informative, else [1, 1]."""
    calls: list[tuple[list[int], int]] = []

    def generate(todo: list[int], round_: int) -> Round:
        calls.append((list(todo), round_))
        samples = [RolloutSample(prompt_ids=[p], response_ids=[j], text=f"{p}.{j}", logprobs=[0.0],
                                 finish_reason="stop", policy_version=0) for p in todo for j in range(K)]
        rewards = [r for p in todo for r in ([1.0, 0.0] if p in informative else [1.0, 1.0])]
        return Round(todo, samples, rewards, torch.tensor([[float(p)] for p in todo for _ in range(K)]))

    return generate, calls


def test_groups_of_equal_rewards_are_replaced_by_new_prompts():
    generate, calls = _scripted(informative={0, 2, 5, 6, 7, 8, 9})
    filled = fill_groups(generate, [0, 1, 2, 3], k=K, num_prompts=10, max_rounds=3,
                         generator=torch.Generator().manual_seed(0))
    assert calls[0] == ([0, 1, 2, 3], 0) and len(calls) >= 2
    assert not set(calls[1][0]) & {0, 1, 2, 3}  # a refill tries prompts not yet tried this iteration
    assert len(filled.prompts) == 4 and set(filled.prompts) <= {0, 2, 5, 6, 7, 8, 9}
    assert filled.prompts[:2] == [0, 2]  # in the order generated
    assert len(filled.samples) == 4 * K and len(filled.rewards) == 4 * K
    assert [s.prompt_ids[0] for s in filled.samples] == [p for p in filled.prompts for _ in range(K)]
    assert filled.aux is not None and filled.aux[:, 0].tolist() == [float(s.prompt_ids[0]) for s in filled.samples]
    m = filled.metrics
    assert m["dynamic/filled_with_dropped"] == 0 and m["dynamic/rounds"] == len(calls)
    assert m["dynamic/drop_rate"] == (m["dynamic/groups_generated"] - sum(
        p in {0, 2, 5, 6, 7, 8, 9} for c, _ in calls for p in c)) / m["dynamic/groups_generated"]


def test_a_batch_still_short_after_the_last_round_is_filled_with_dropped_groups():
    generate, calls = _scripted(informative={1})
    filled = fill_groups(generate, [0, 1, 2], k=K, num_prompts=5, max_rounds=2,
                         generator=torch.Generator().manual_seed(1))
    assert len(calls) == 2 and len(filled.prompts) == 3 and filled.prompts[0] == 1
    assert filled.metrics["dynamic/filled_with_dropped"] == 2 and filled.metrics["dynamic/rounds"] == 2


def test_a_full_first_round_needs_no_second():
    generate, calls = _scripted(informative={0, 1})
    filled = fill_groups(generate, [0, 1], k=K, num_prompts=5, max_rounds=3, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1 and filled.prompts == [0, 1] and filled.metrics["dynamic/drop_rate"] == 0
