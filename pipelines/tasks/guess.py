"""A multi-turn task without tools: guess a secret number from "higher" / "lower" replies.

The environment (``environment: {cls: pipelines.tasks.guess:GuessEnvironment}``) picks nothing: the
secret is the task's. Each assistant turn is a guess (its last integer); the user answers "higher"
or "lower" until the guess is right (reward 1.0, success) or ``max_guesses`` turns are spent
(reward 0.0). Binary search always wins within 4 guesses on 1..8; ``demonstration`` plays it
through a real environment, so the SFT conversations are exactly what a rollout would see.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from pipelines.environments.base import Message, Step, Turn
from pipelines.tasks.arithmetic import write_rows

LOW, HIGH = 1, 8
INVALID = "Say a number."
_INTEGER = re.compile(r"-?\d+")


def last_integer(text: str) -> int | None:
    """The last integer written in ``text``; None when there is none."""
    found = _INTEGER.findall(text)
    return int(found[-1]) if found else None


def opening(low: int, high: int) -> str:
    """The user's first turn for a range."""
    return f"I picked a number from {low} to {high}. Guess it."


class GuessEnvironment:
    """One trajectory of the guessing game (see the module docstring).

    Every turn counts against ``max_guesses``, a turn without a number included (the user answers
    "Say a number.", info ``invalid_guesses``); a wrong guess is answered "higher" or "lower", info
    ``guesses``. The last turn's step has ``success`` (1.0 or 0.0) and the reward.
    """

    def __init__(self, max_guesses: int = 4) -> None:
        if max_guesses < 1:
            raise ValueError(f"max_guesses must be at least 1, not {max_guesses}")
        self.max_guesses = max_guesses
        self._secret: int | None = None
        self._turns = 0

    def tools(self) -> None:
        """No tools."""
        return None

    def reset(self, task: dict[str, Any]) -> list[Message]:
        """Start a game: ``task`` has ``secret`` and optionally ``low`` and ``high`` (default 1..8)."""
        low, high = int(task.get("low", LOW)), int(task.get("high", HIGH))
        self._secret = int(task["secret"])
        if not low <= self._secret <= high:
            raise ValueError(f"secret {self._secret} is outside {low}..{high}")
        self._turns = 0
        return [{"role": "user", "content": opening(low, high)}]

    def step(self, turn: Turn) -> Step:
        """Answer a guess: done on the secret (reward 1.0) or on the last allowed turn (reward 0.0)."""
        if self._secret is None:
            raise RuntimeError("step() before reset()")
        self._turns += 1
        guess = last_integer(turn.text)
        if guess == self._secret:
            return Step([], reward=1.0, done=True, info={"success": 1.0, "guesses": 1.0})
        info = {"invalid_guesses": 1.0} if guess is None else {"guesses": 1.0}
        if self._turns >= self.max_guesses:
            return Step([], reward=0.0, done=True, info={"success": 0.0, **info})
        reply = INVALID if guess is None else ("higher" if guess < self._secret else "lower")
        return Step([{"role": "user", "content": reply}], reward=None, done=False, info=info)


def demonstration(task: dict[str, Any]) -> list[Message]:
    """The expert conversation for ``task``: binary-search guesses, played through a real environment
    (the assistant's turns are the bare numbers, e.g. ``"4"``)."""
    low, high = int(task.get("low", LOW)), int(task.get("high", HIGH))
    env = GuessEnvironment(max_guesses=max(1, (high - low + 1).bit_length()))
    messages = env.reset(task)
    while True:
        guess = str((low + high) // 2)
        step = env.step(Turn(text=guess))
        messages.append({"role": "assistant", "content": guess})
        if step.done:
            assert step.info.get("success") == 1.0, f"binary search failed on {task}"
            return messages
        messages.extend(step.messages)
        if step.messages[0]["content"] == "higher":
            low = int(guess) + 1
        else:
            high = int(guess) - 1


def task_row(secret: int, low: int = LOW, high: int = HIGH) -> dict[str, Any]:
    """A task row: ``secret``, ``low``, ``high`` and ``prompt`` (the opening, for display)."""
    return {"secret": secret, "low": low, "high": high, "prompt": opening(low, high)}


def _task_rows(tasks: list[dict[str, Any]]) -> dict[str, list]:
    return {name: [t[name] for t in tasks] for name in ("secret", "low", "high", "prompt")}


def write_datasets(out_dir: str | Path, *, num_sft: int, num_tasks: int, num_eval: int, seed: int,
                   file_type: str = "jsonl") -> dict[str, str]:
    """Write the task's datasets; secrets are drawn uniformly in 1..8 (train and eval share values:
    there are only 8).

    Args:
        out_dir: the directory to write into (created).
        num_sft: demonstrations in ``sft_train``.
        num_tasks: tasks in ``prompts_train``.
        num_eval: rows of ``sft_eval`` and ``prompts_eval`` (the same secrets).
        seed: the same seed writes the same files.
        file_type: ``jsonl`` (JSON Lines) or ``parquet``.

    Returns:
        Output name → path: ``sft_train``, ``sft_eval`` (column ``messages``: a demonstration),
        ``prompts_train``, ``prompts_eval`` (columns ``secret``, ``low``, ``high``, ``prompt``).
    """
    if file_type not in ("jsonl", "parquet"):
        raise ValueError(f"unknown file_type {file_type!r}; expected jsonl or parquet")
    out = Path(out_dir)
    rng = random.Random(seed)

    def draw(n: int) -> list[dict[str, Any]]:
        return [task_row(rng.randint(LOW, HIGH)) for _ in range(n)]

    eval_tasks = draw(num_eval)
    rows = {
        "sft_train": {"messages": [demonstration(t) for t in draw(num_sft)]},
        "sft_eval": {"messages": [demonstration(t) for t in eval_tasks]},
        "prompts_train": _task_rows(draw(num_tasks)),
        "prompts_eval": _task_rows(eval_tasks),
    }
    return {name: str(write_rows(columns, out / f"{name}.{file_type}")) for name, columns in rows.items()}
