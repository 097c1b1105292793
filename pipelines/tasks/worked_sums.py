"""A long-response, verifiable task: sums of many terms with the worked steps written out.

The prompt lists the terms (``12+34+5+48=``); the answer writes every running sum, then the total::

    12+34=46;46+5=51;51+48=99;answer=99

With the char tokenizer a token is a character, so the answer's length is set by the number of
terms: about 11 tokens per step with two-digit terms (``terms: 12`` → about 130 tokens). It is the
workload where generation dominates an online iteration, as reasoning answers of hundreds of
tokens do, while every answer is still checked by a program (``reward``).

Scoring (``reward``): half for the steps, half for the total. The steps' part is the share of the
expected steps that are right *as written*: step i reads ``s+t=s'`` where ``s`` is the running sum
the answer itself carried (the first term, then the previous step's result), ``t`` the prompt's next
term and ``s'`` their sum. One slip costs one step, not every step after it (the model's own running
sum is what it adds to next), so a policy that adds right more often scores more: a dense signal.
The total's part is 1 when the last segment is ``answer=<the sum of the terms>``. A right answer with
every step written scores 1.0; ``check`` is the same score, and ``eval/exact_match`` counts 1.0s.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from pipelines.tasks.arithmetic import as_conversations, write_rows

STEP_SEPARATOR = ";"


@dataclass(frozen=True)
class Sum:
    """One problem: the sum of ``terms`` (at least two)."""

    terms: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return "+".join(map(str, self.terms)) + "="

    def steps(self) -> list[str]:
        """The expected steps ``s+t=s'``, one per term after the first."""
        out, running = [], self.terms[0]
        for term in self.terms[1:]:
            out.append(f"{running}+{term}={running + term}")
            running += term
        return out

    @property
    def answer(self) -> str:
        return STEP_SEPARATOR.join([*self.steps(), f"answer={sum(self.terms)}"])


def parse_prompt(prompt: str) -> Sum | None:
    """The problem of a prompt ``"a+b+...="``; None when the prompt is not one."""
    if not prompt.endswith("="):
        return None
    parts = prompt[:-1].split("+")
    if len(parts) < 2 or not all(p.isdigit() for p in parts):
        return None
    return Sum(tuple(int(p) for p in parts))


def check(prompt: str, response: str) -> float:
    """The score of one response (see the module docstring): in [0, 1], 1.0 when all of it is right."""
    problem = parse_prompt(prompt)
    if problem is None:
        return 0.0
    written = response.strip().split(STEP_SEPARATOR)
    carried, right = str(problem.terms[0]), 0
    for step, term in zip(written, problem.terms[1:], strict=False):
        left, _, result = step.partition("=")
        addend, plus, added = left.partition("+")
        if plus and addend.isdigit() and added.isdigit() and result.isdigit():
            right += addend == carried and int(added) == term and int(addend) + term == int(result)
        carried = result
    total = written[-1] == f"answer={sum(problem.terms)}"
    return 0.5 * right / (len(problem.terms) - 1) + 0.5 * float(total)


def reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Function reward: ``pipelines.tasks.worked_sums:reward``."""
    return [check(p, r) for p, r in zip(prompts, responses, strict=True)]


def wrong_answer(problem: Sum, rng: random.Random) -> str:
    """A plausible wrong worked answer: one step's sum is off by 1 or 10 and the error carries on."""
    steps, running = [], problem.terms[0]
    slip = rng.randrange(1, len(problem.terms))
    for i, term in enumerate(problem.terms[1:], start=1):
        result = running + term + (rng.choice((-10, -1, 1, 10)) if i == slip else 0)
        steps.append(f"{running}+{term}={max(0, result)}")
        running = max(0, result)
    return STEP_SEPARATOR.join([*steps, f"answer={running}"])


def draw(n: int, terms: int, max_operand: int, rng: random.Random, exclude: set[Sum] | None = None) -> list[Sum]:
    """n distinct problems of ``terms`` terms in [0, max_operand], none of them in ``exclude``."""
    out: dict[Sum, None] = {}
    while len(out) < n:
        problem = Sum(tuple(rng.randint(0, max_operand) for _ in range(terms)))
        if not exclude or problem not in exclude:
            out[problem] = None
    return list(out)


def positions_needed(terms: int, max_operand: int) -> int:
    """Model positions that hold a prompt and its worked answer (character tokens), rounded up to 64."""
    digits = len(str(max_operand))
    sum_digits = len(str(terms * max_operand))
    longest = terms * (digits + 1) + (terms - 1) * (sum_digits + digits + sum_digits + 3) + 8 + sum_digits + 4
    return 64 * ((longest + 63) // 64)


def write_datasets(out_dir: str | Path, *, terms: int, max_operand: int, num_sft: int, num_pairs: int,
                   num_prompts: int, num_eval: int, seed: int, data_format: str = "text",
                   file_type: str = "parquet") -> dict[str, Path]:
    """Every dataset of the task, the same names as ``arithmetic.write_datasets`` (held-out problems
    never appear in a training split)."""
    rng = random.Random(seed)
    held_out = draw(num_eval, terms, max_operand, rng)
    banned = set(held_out)
    train = [draw(n, terms, max_operand, rng, banned) for n in (num_sft, num_pairs, num_prompts)]

    def sft(problems: list[Sum]) -> dict[str, list[str]]:
        return {"prompt": [p.prompt for p in problems], "response": [p.answer for p in problems]}

    def pairs(problems: list[Sum]) -> dict[str, list[str]]:
        return {"prompt": [p.prompt for p in problems], "chosen": [p.answer for p in problems],
                "rejected": [wrong_answer(p, rng) for p in problems]}

    def prompts(problems: list[Sum]) -> dict[str, list[str]]:
        return {"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]}

    texts = {"sft_train": sft(train[0]), "sft_eval": sft(held_out), "pairs_train": pairs(train[1]),
             "pairs_eval": pairs(held_out), "prompts_train": prompts(train[2]), "prompts_eval": prompts(held_out)}
    out = Path(out_dir)
    return {name: write_rows(rows if data_format == "text" else
                             as_conversations(name, rows, implicit_prompt=data_format == "implicit_prompt"),
                             out / f"{name}.{file_type}")
            for name, rows in texts.items()}
