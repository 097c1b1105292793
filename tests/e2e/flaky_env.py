"""An environment that fails: the calculator's, raising on some steps and hanging on others (the
flaky-environment test of ``test_agents.py``; importable by the environment actors)."""

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
