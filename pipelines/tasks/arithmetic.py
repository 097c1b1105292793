"""A synthetic, verifiable task: integer addition prompts such as ``37+45=`` with exact answers.

It is small enough for a tiny model to learn in minutes on two CPU cores, and every response can be
scored by a program, so later stages (rejection sampling, PPO) have a reward without a hub.

Train and eval splits never share an (a, b) problem.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class Problem:
    """One addition problem a + b."""

    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)


def parse_prompt(prompt: str) -> Problem | None:
    """Recover the problem from a prompt ``"a+b="``; None when the prompt is not one."""
    if not prompt.endswith("="):
        return None
    left, plus, right = prompt[:-1].partition("+")
    if not plus or not left.isdigit() or not right.isdigit():
        return None
    return Problem(int(left), int(right))


VERBOSE = "sum is {}"  # the second answer style (``verbose_fraction``): "sum is 82" instead of "82"


def check(prompt: str, response: str) -> float:
    """1.0 when the response (stripped) is exactly the sum, bare or in the verbose style, else 0.0."""
    problem = parse_prompt(prompt)
    if problem is None:
        return 0.0
    return 1.0 if response.strip() in (problem.answer, VERBOSE.format(problem.answer)) else 0.0


def reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Function reward for later stages: ``module:function`` = ``pipelines.tasks.arithmetic:reward``."""
    return [check(p, r) for p, r in zip(prompts, responses, strict=True)]


def sentence(prompts: list[str], responses: list[str]) -> list[float]:
    """A designer's objective the preference pairs do not encode: 1.0 when the response is written as a
    sentence, ``sum is N`` (readability), right or wrong (``pipelines.tasks.arithmetic:sentence``)."""
    return [1.0 if r.strip().startswith("sum is ") and r.strip()[7:].isdigit() else 0.0 for r in responses]


def terse(prompts: list[str], responses: list[str]) -> list[float]:
    """A designer's objective the preference pairs do not encode: 1.0 when the response is the bare
    number (no words), else 0.0, right or wrong (``pipelines.tasks.arithmetic:terse``)."""
    return [1.0 if r.strip().isdigit() else 0.0 for r in responses]


def restyle(responses: list[str], fraction: float, rng: random.Random) -> list[str]:
    """Each response independently in the verbose style with probability ``fraction`` (0: unchanged,
    and ``rng`` untouched)."""
    if not fraction:
        return responses
    return [VERBOSE.format(r) if rng.random() < fraction else r for r in responses]


def wrong_answer(problem: Problem, rng: random.Random, max_value: int) -> str:
    """A wrong answer, as a weak model would give: half the time any other number in
    [0, max_value], otherwise a near miss in the units (±1) or tens (±10) digit."""
    correct = problem.a + problem.b
    kind = rng.random()
    if kind < 0.5:
        candidate = rng.randrange(0, max_value + 1)
    elif kind < 0.75:
        candidate = correct + rng.choice((-10, 10))
    else:
        candidate = correct + rng.choice((-1, 1))
    if candidate < 0 or candidate == correct:
        candidate = correct + 1
    return str(candidate)


def split_problems(max_operand: int, eval_fraction: float, seed: int) -> tuple[list[Problem], list[Problem]]:
    """All problems with operands in [0, max_operand], shuffled and split into train / eval."""
    problems = [Problem(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(seed).shuffle(problems)
    n_eval = max(1, int(len(problems) * eval_fraction))
    return problems[n_eval:], problems[:n_eval]


def sample(problems: list[Problem], n: int, rng: random.Random) -> list[Problem]:
    """n problems drawn with replacement (without, when n ≤ len(problems))."""
    if n <= len(problems):
        return rng.sample(problems, n)
    return [rng.choice(problems) for _ in range(n)]


def sft_rows(problems: list[Problem]) -> dict[str, list[str]]:
    return {"prompt": [p.prompt for p in problems], "response": [p.answer for p in problems]}


def pair_rows(problems: list[Problem], rng: random.Random, max_value: int) -> dict[str, list[str]]:
    return {
        "prompt": [p.prompt for p in problems],
        "chosen": [p.answer for p in problems],
        "rejected": [wrong_answer(p, rng, max_value) for p in problems],
    }


# What a judge of the task reads (``judge_rows``; pipelines/judge.yaml's reward template): the prompt
# and an answer, then the question. The judge works the sum out, copies the answer beside it, then
# says whether they are equal: "46=46;yes" / "46=47;no". Measured with a 4-layer model: the bare
# "yes"/"no" stayed at 0.50-0.61 held-out accuracy after 2000 steps (it must compare the answer with a
# sum it never wrote down); "46;no" reached 0.735 in 800 steps.
JUDGE_TEMPLATE = "{prompt}{response} right?"


def judge_rows(pairs: dict[str, list[str]]) -> dict[str, list[str]]:
    """SFT rows that teach a judge the task: each pair's prompt with its right answer and its wrong
    one, in ``JUDGE_TEMPLATE``, answered with the sum, the answer and "yes" / "no"; as many
    right as wrong answers (``right_sum=answer;yes``). The pairs' chosen side is the right answer."""
    prompts, responses = [], []
    for prompt, chosen, rejected in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"], strict=True):
        for answer, verdict in ((chosen, "yes"), (rejected, "no")):
            prompts.append(JUDGE_TEMPLATE.replace("{prompt}", prompt).replace("{response}", answer))
            responses.append(f"{chosen}={answer};{verdict}")
    return {"prompt": prompts, "response": responses}


def judge_verdict(prompts: list[str], responses: list[str]) -> list[float]:
    """A judge's held-out accuracy, as a checker of ``judge_rows``' prompts: 1.0 when the verdict after
    ";" says rightly whether the answer in the prompt is the sum (the worked-out sum is not graded)."""
    scores = []
    for prompt, response in zip(prompts, responses, strict=True):
        asked = prompt.removesuffix(" right?")
        left, _, answer = asked.partition("=")
        problem = parse_prompt(left + "=")
        truth = "yes" if problem is not None and answer == problem.answer else "no"
        scores.append(1.0 if response.strip().rpartition(";")[2].strip() == truth else 0.0)
    return scores


def prompt_rows(problems: list[Problem]) -> dict[str, list[str]]:
    return {"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]}


def write_parquet(rows: dict[str, list[str]], path: str | Path) -> Path:
    """Write string columns to a Parquet file, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: pa.array(v, type=pa.string()) for k, v in rows.items()}), path)
    return path


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def as_conversations(name: str, rows: dict[str, list[str]], implicit_prompt: bool = False) -> dict[str, list]:
    """The same rows in the conversational formats: SFT as ``messages``; pairs as a user-turn prompt
    and assistant-turn completions (or, with ``implicit_prompt``, whole conversations that share the
    user turn); prompts as one user turn."""
    if name.startswith("sft"):
        return {"messages": [_user(p) + _assistant(r) for p, r in zip(rows["prompt"], rows["response"], strict=True)]}
    if name.startswith("pairs"):
        prompts = [_user(p) for p in rows["prompt"]]
        chosen = [_assistant(c) for c in rows["chosen"]]
        rejected = [_assistant(r) for r in rows["rejected"]]
        if implicit_prompt:
            return {"chosen": [p + c for p, c in zip(prompts, chosen, strict=True)],
                    "rejected": [p + r for p, r in zip(prompts, rejected, strict=True)]}
        return {"prompt": prompts, "chosen": chosen, "rejected": rejected}
    return {"prompt": [_user(p) for p in rows["prompt"]], "answer": rows["answer"]}


def write_rows(rows: dict[str, list], path: Path) -> Path:
    """Parquet (string or conversation columns) or JSON Lines, by the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(pa.table(rows), path)
    else:
        names = list(rows)
        with path.open("w") as f:
            for values in zip(*(rows[n] for n in names), strict=True):
                f.write(json.dumps(dict(zip(names, values, strict=True))) + "\n")
    return path


DATA_FORMATS = ("text", "conversational", "implicit_prompt")


def write_datasets(
    out_dir: str | Path,
    *,
    max_operand: int,
    num_sft: int,
    num_pairs: int,
    num_prompts: int,
    num_eval: int,
    eval_fraction: float,
    seed: int,
    verbose_fraction: float = 0.0,
    data_format: str = "text",
    file_type: str = "parquet",
) -> dict[str, Path]:
    """Write every dataset of the task.

    With ``verbose_fraction`` > 0, that share of the SFT responses and of each side of the pairs
    (independently of which side is chosen, so the preferences say nothing about it) is written as
    ``sum is N``; the problems and wrong answers are the same as without it.

    Args:
        data_format: ``text`` (string columns), ``conversational`` (``as_conversations``) or
            ``implicit_prompt`` (conversational, the pairs without a prompt column). The same seed
            draws the same problems and answers in every format.
        file_type: ``parquet`` or ``jsonl``.

    Returns:
        Output name → path: sft_train, sft_eval, pairs_train, pairs_eval, prompts_train,
        prompts_eval, judge_train, judge_eval (``judge_rows``: SFT rows for a yes/no judge).
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"unknown data_format {data_format!r}; expected one of {DATA_FORMATS}")
    out = Path(out_dir)
    train, held_out = split_problems(max_operand, eval_fraction, seed)
    rng = random.Random(seed + 1)
    eval_problems = sample(held_out, num_eval, rng)
    style = random.Random(seed + 2)

    def styled(rows: dict[str, list[str]]) -> dict[str, list[str]]:
        return {k: v if k == "prompt" else restyle(v, verbose_fraction, style) for k, v in rows.items()}

    texts = {
        "sft_train": styled(sft_rows(sample(train, num_sft, rng))),
        "sft_eval": sft_rows(eval_problems),
        "pairs_train": styled(pair_rows(sample(train, num_pairs, rng), rng, 2 * max_operand)),
        "pairs_eval": styled(pair_rows(eval_problems, rng, 2 * max_operand)),
        "prompts_train": prompt_rows(sample(train, num_prompts, rng)),
        "prompts_eval": prompt_rows(eval_problems),
    }
    # the judge's rows come from the pairs (no new draws: the other files are the same as without them)
    texts |= {"judge_train": judge_rows(texts["pairs_train"]), "judge_eval": judge_rows(texts["pairs_eval"])}
    return {name: write_rows(rows if data_format == "text" else
                             as_conversations(name.replace("judge", "sft"), rows,
                                              implicit_prompt=data_format == "implicit_prompt"),
                             out / f"{name}.{file_type}")
            for name, rows in texts.items()}
