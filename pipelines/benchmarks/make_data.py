"""Write the data files of the shipped lm-eval tasks (provenance: generated here, from the synthetic
arithmetic task; rerun to reproduce them byte for byte):

    python -m pipelines.benchmarks.make_data

Both files hold problems of the held-out split that ``synthetic_task`` makes with ``max_operand: 49``,
``eval_fraction: 0.1`` and ``seed: 0`` (the quickstart's and ``pipelines/distill.yaml``'s task): no
model trained by those pipelines saw them (``tests/unit/test_benchmarks.py`` checks it).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pipelines.tasks.arithmetic import split_problems, wrong_answer

HERE = Path(__file__).resolve().parent
MAX_OPERAND, EVAL_FRACTION, SEED, ROWS = 49, 0.1, 0, 100


def rows() -> tuple[list[dict], list[dict]]:
    """(generation rows {question, answer}, multiple-choice rows {question, choices, label})."""
    _, held_out = split_problems(MAX_OPERAND, EVAL_FRACTION, SEED)
    rng = random.Random(1234)
    gen = [{"question": p.prompt, "answer": p.answer} for p in held_out[:ROWS]]
    choice = []
    for p in held_out[ROWS : 2 * ROWS]:
        ordered = [p.answer]
        while len(ordered) < 4:
            wrong = wrong_answer(p, rng, 2 * MAX_OPERAND)
            if wrong not in ordered:
                ordered.append(wrong)
        rng.shuffle(ordered)
        choice.append({"question": p.prompt, "choices": ordered, "label": ordered.index(p.answer)})
    return gen, choice


def main() -> None:
    gen, choice = rows()
    for name, data in (("arith_heldout.jsonl", gen), ("arith_choice.jsonl", choice)):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in data))


if __name__ == "__main__":
    main()
