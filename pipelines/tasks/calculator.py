"""A tool-using task: ``a * b + c`` questions a tiny model answers with a calculator.

Operands are a, b in [2, 19] and c in [1, 99]: a tiny model cannot multiply two-digit numbers in one
shot, but with the tools it can call ``multiply(a, b)``, then ``add(product, c)``, then answer the
number. ``CalculatorEnvironment`` (``environment: {cls: pipelines.tasks.calculator:CalculatorEnvironment}``)
runs the tool calls and scores the final answer; ``demonstration`` runs a scripted expert through a
real environment, so the SFT conversations are exactly what a rollout would see.

Train and eval splits never share an (a, b, c) problem.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.environments.base import Message, ToolCall, Turn
from pipelines.environments.tools import ToolEnvironment, parse_tool_calls, render_tool_call
from pipelines.tasks.arithmetic import write_rows

FACTORS = range(2, 20)  # a and b
OFFSETS = range(1, 100)  # c
EVAL_FRACTION = 0.1  # share of all problems held out for evaluation
_INTEGER = re.compile(r"-?\d+")
_QUESTION = re.compile(r"What is (-?\d+) \* (-?\d+) \+ (-?\d+)\?")


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first addend.
        b: the second addend.

    Returns:
        The sum a + b.
    """
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor.
        b: the second factor.

    Returns:
        The product a * b.
    """
    return a * b


TOOLS = (add, multiply)


def last_integer(text: str) -> int | None:
    """The last integer written in ``text`` (``-?\\d+``); None when there is none."""
    found = _INTEGER.findall(text)
    return int(found[-1]) if found else None


@dataclass(frozen=True)
class Problem:
    """One problem a * b + c."""

    a: int
    b: int
    c: int

    @property
    def question(self) -> str:
        return f"What is {self.a} * {self.b} + {self.c}?"

    @property
    def answer(self) -> int:
        return self.a * self.b + self.c

    def task(self) -> dict[str, Any]:
        """The task row: ``question``, ``answer`` and ``prompt`` (the question, for display)."""
        return {"question": self.question, "answer": self.answer, "prompt": self.question}


def parse_question(question: str) -> Problem:
    """Recover the problem from its question text; ValueError when it is not one."""
    match = _QUESTION.fullmatch(question.strip())
    if match is None:
        raise ValueError(f"not a calculator question: {question!r}")
    return Problem(*(int(g) for g in match.groups()))


class CalculatorEnvironment(ToolEnvironment):
    """One trajectory of a calculator task: ``add`` and ``multiply`` tools; the turn without a tool
    call is the final answer, right (reward 1.0, success) when its last integer is the task's answer."""

    def __init__(self, tool_timeout_s: float = 5.0) -> None:
        super().__init__(list(TOOLS), tool_timeout_s=tool_timeout_s)
        self._answer: int | None = None

    def reset(self, task: dict[str, Any]) -> list[Message]:
        """Start a task (a dict with ``question`` and ``answer``): the question as the user's turn."""
        self._answer = int(task["answer"])
        return [{"role": "user", "content": str(task["question"])}]

    def answer(self, text: str) -> tuple[float, bool]:
        """Score the final answer: (1.0, True) when its last integer is the task's answer, else (0.0, False)."""
        if self._answer is None:
            raise RuntimeError("answer() before reset()")
        guess = last_integer(text)
        return (1.0, True) if guess == self._answer else (0.0, False)


def _turn(text: str) -> Turn:
    """The policy's turn as the rollout builds it: the text and its parsed tool calls."""
    calls, malformed = parse_tool_calls(text)
    return Turn(text=text, tool_calls=tuple(calls), malformed=tuple(malformed))


def _call(env: CalculatorEnvironment, messages: list[Message], call: ToolCall) -> int:
    """Play one tool-call turn through ``env``; append it and the tool's answer; return the result."""
    text = render_tool_call(call)
    step = env.step(_turn(text))
    assert not step.done and len(step.messages) == 1 and step.messages[0]["role"] == "tool", step
    messages.append({"role": "assistant", "content": text})
    messages.extend(step.messages)
    return int(json.loads(step.messages[0]["content"]))


def demonstration(task: dict[str, Any]) -> list[Message]:
    """The expert conversation for ``task``, played by a scripted policy through a real environment:
    user question, ``multiply(a, b)``, its result, ``add(product, c)``, its result, the answer number."""
    problem = parse_question(task["question"])
    env = CalculatorEnvironment()
    messages = env.reset(task)
    product = _call(env, messages, ToolCall("multiply", {"a": problem.a, "b": problem.b}))
    total = _call(env, messages, ToolCall("add", {"a": product, "b": problem.c}))
    final = str(total)
    step = env.step(_turn(final))
    assert step.done and step.info.get("success") and step.reward == 1.0, f"the scripted policy failed: {step}"
    messages.append({"role": "assistant", "content": final})
    return messages


def tool_schemas() -> list[dict[str, Any]]:
    """The JSON schemas of the environment's tools (what the chat template is given as ``tools=``)."""
    return CalculatorEnvironment().tools()


def split_problems(seed: int) -> tuple[list[Problem], list[Problem]]:
    """Every problem, shuffled by ``seed`` and split into disjoint train / eval pools."""
    problems = [Problem(a, b, c) for a in FACTORS for b in FACTORS for c in OFFSETS]
    random.Random(seed).shuffle(problems)
    n_eval = int(len(problems) * EVAL_FRACTION)
    return problems[n_eval:], problems[:n_eval]


def _sample(pool: list[Problem], n: int, rng: random.Random) -> list[Problem]:
    """n problems of ``pool``, without replacement when the pool is large enough."""
    return rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]


def _task_rows(problems: list[Problem]) -> dict[str, list]:
    tasks = [p.task() for p in problems]
    return {name: [t[name] for t in tasks] for name in ("question", "answer", "prompt")}


def _sft_rows(problems: list[Problem], tools_json: str) -> dict[str, list]:
    return {"messages": [demonstration(p.task()) for p in problems], "tools": [tools_json] * len(problems)}


def write_datasets(out_dir: str | Path, *, num_sft: int, num_tasks: int, num_eval: int, seed: int,
                   file_type: str = "jsonl") -> dict[str, str]:
    """Write the task's datasets.

    Args:
        out_dir: the directory to write into (created).
        num_sft: demonstrations in ``sft_train``.
        num_tasks: tasks in ``prompts_train``.
        num_eval: rows of ``sft_eval`` and ``prompts_eval`` (the same held-out problems).
        seed: the same seed writes the same files.
        file_type: ``jsonl`` (JSON Lines) or ``parquet``.

    Returns:
        Output name → path: ``sft_train``, ``sft_eval`` (columns ``messages``: a demonstration, and
        ``tools``: the tools' JSON schemas as a JSON string), ``prompts_train``, ``prompts_eval``
        (columns ``question``, ``answer`` (int), ``prompt``).
    """
    if file_type not in ("jsonl", "parquet"):
        raise ValueError(f"unknown file_type {file_type!r}; expected jsonl or parquet")
    out = Path(out_dir)
    train, held_out = split_problems(seed)
    rng = random.Random(seed + 1)
    eval_problems = _sample(held_out, num_eval, rng)
    tools_json = json.dumps(tool_schemas())
    rows = {
        "sft_train": _sft_rows(_sample(train, num_sft, rng), tools_json),
        "sft_eval": _sft_rows(eval_problems, tools_json),
        "prompts_train": _task_rows(_sample(train, num_tasks, rng)),
        "prompts_eval": _task_rows(eval_problems),
    }
    return {name: str(write_rows(columns, out / f"{name}.{file_type}")) for name, columns in rows.items()}
