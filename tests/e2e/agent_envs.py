"""Environments of the agents' end-to-end tests (importable by the environment actors): the
calculator failing on purpose, and the calculator with partial credit."""

from __future__ import annotations

import random
import time

from pipelines.environments.base import Step, Turn
from pipelines.tasks.calculator import CalculatorEnvironment


class FlakyCalculator(CalculatorEnvironment):
    """Each ``step`` raises with probability ``fail`` / 2 and hangs for ``hang_s`` with probability
    ``fail`` / 2 (past the stage's ``call_timeout_s``); a fresh instance draws anew."""

    def __init__(self, fail: float = 0.2, hang_s: float = 30.0) -> None:
        super().__init__()
        self.fail, self.hang_s, self.rng = fail, hang_s, random.Random()

    def step(self, turn: Turn) -> Step:
        draw = self.rng.random()
        if draw < self.fail / 2:
            raise RuntimeError("the calculator service is down")
        if draw < self.fail:
            time.sleep(self.hang_s)
        return super().step(turn)


class PartialCreditCalculator(CalculatorEnvironment):
    """The calculator with 0.5 for each tool call that runs without an error: a briefly trained
    policy's trajectories then differ in reward, so on-policy DPO finds pairs."""

    def step(self, turn: Turn) -> Step:
        step = super().step(turn)
        ok = step.info.get("tool_calls", 0.0) - step.info.get("tool_errors", 0.0)
        return Step(step.messages, (step.reward or 0.0) + 0.5 * ok, step.done, step.info)
