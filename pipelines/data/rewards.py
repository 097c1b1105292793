"""Python function rewards named in the YAML as ``module:function``.

The function is called on batches: ``fn(prompts: list[str], responses: list[str]) -> list[float]``.
Every failure is a RewardError that names the reward and, where there is one, the offending item;
a reward is never silently replaced by zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from pipelines.data.formats import plain_prompt
from pipelines.environments.base import load_object
from pipelines.errors import RewardError

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


def load_reward_function(spec: str) -> RewardFn:
    """Import ``module:function``; errors name the spec and what is wrong with it."""
    fn = load_object(spec, f"reward {spec!r}", error=RewardError,
                     form="module:function', e.g. 'pipelines.tasks.arithmetic:reward")
    attr = spec.partition(":")[2]
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {attr!r} is not callable")
    return fn


class FunctionReward:
    """A function reward that checks every result. Picklable: only the spec travels."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._fn: RewardFn | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "_fn": None}

    @property
    def fn(self) -> RewardFn:
        if self._fn is None:
            self._fn = load_reward_function(self.spec)
        return self._fn

    def score(self, prompts: list[Any], responses: list[str]) -> list[float]:
        """Scores, one per (prompt, response); raises RewardError naming the offending item. A
        conversation prompt reaches the function as its last user turn (``formats.plain_prompt``)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        prompts = [plain_prompt(p) for p in prompts]
        try:
            raw = self.fn(list(prompts), list(responses))
        except Exception as exc:  # the user's code; find the item that breaks it
            raise RewardError(self._describe_raise(prompts, responses, exc)) from None
        try:
            values = list(raw)
        except TypeError:
            raise RewardError(f"reward {self.spec!r} returned {type(raw).__name__}, expected a list of floats"
                              ) from None
        if len(values) != len(prompts):
            raise RewardError(f"reward {self.spec!r} returned {len(values)} scores for {len(prompts)} responses")
        scores = []
        for i, value in enumerate(values):
            try:
                score = float(value)
            except (TypeError, ValueError):
                raise RewardError(self._item(i, prompts, responses, f"returned non-numeric {value!r}")) from None
            if not math.isfinite(score):
                raise RewardError(self._item(i, prompts, responses, f"returned {score}"))
            scores.append(score)
        return scores

    def _item(self, i: int, prompts: list[str], responses: list[str], what: str) -> str:
        return f"reward {self.spec!r} {what} for item {i} (prompt {prompts[i]!r}, response {responses[i]!r})"

    def _describe_raise(self, prompts: list[str], responses: list[str], exc: Exception) -> str:
        error = f"{type(exc).__name__}: {exc}"
        for i in range(len(prompts)):
            try:
                self.fn([prompts[i]], [responses[i]])
            except Exception as item_exc:
                return self._item(i, prompts, responses, f"raised {type(item_exc).__name__}: {item_exc}")
        return f"reward {self.spec!r} raised on a batch of {len(prompts)} (no single item fails alone): {error}"
