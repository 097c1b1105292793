"""The shipped multi-turn tasks: the calculator (tools) and the guessing game (no tools)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.environments.base import ToolCall, Turn
from pipelines.environments.tools import parse_tool_calls, render_tool_call
from pipelines.tasks import calculator, guess
from pipelines.tasks.calculator import CalculatorEnvironment, Problem
from pipelines.tasks.guess import GuessEnvironment


def read_rows(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def tool_turn(name: str, **arguments: int) -> Turn:
    text = render_tool_call(ToolCall(name, arguments))
    calls, malformed = parse_tool_calls(text)
    return Turn(text=text, tool_calls=tuple(calls), malformed=tuple(malformed))


# ---------------------------------------------------------------- calculator


def test_calculator_tools_have_schemas() -> None:
    schemas = calculator.tool_schemas()
    assert [s["function"]["name"] for s in schemas] == ["add", "multiply"]
    for schema in schemas:
        assert list(schema["function"]["parameters"]["properties"]) == ["a", "b"]


@pytest.mark.parametrize("seed", range(5))
def test_calculator_demonstrations_succeed(seed: int) -> None:
    rng = random.Random(seed)
    problems = [Problem(rng.choice(calculator.FACTORS), rng.choice(calculator.FACTORS), rng.choice(calculator.OFFSETS))
                for _ in range(40)] + [Problem(19, 19, 99), Problem(2, 2, 1)]
    for problem in problems:
        messages = calculator.demonstration(problem.task())
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
        assert messages[0]["content"] == problem.question
        assert parse_tool_calls(messages[1]["content"])[0] == [ToolCall("multiply", {"a": problem.a, "b": problem.b})]
        assert json.loads(messages[2]["content"]) == problem.a * problem.b
        assert parse_tool_calls(messages[3]["content"])[0] == [ToolCall("add", {"a": problem.a * problem.b,
                                                                                 "b": problem.c})]
        assert json.loads(messages[4]["content"]) == problem.answer
        assert messages[5]["content"] == str(problem.answer)


def test_calculator_rewards_the_last_integer() -> None:
    env = CalculatorEnvironment()
    assert env.reset({"question": "What is 7 * 13 + 25?", "answer": 116}) == [
        {"role": "user", "content": "What is 7 * 13 + 25?"}]
    assert env.answer("116") == (1.0, True)
    assert env.answer("7 * 13 + 25 = 116") == (1.0, True)
    assert env.answer("116 or maybe 117") == (0.0, False)
    assert env.answer("I don't know") == (0.0, False)
    assert env.answer("-116") == (0.0, False)
    final = env.step(Turn(text="116"))
    assert final.done and final.reward == 1.0 and final.messages == [] and final.info["success"]
    env.reset({"question": "What is 7 * 13 + 25?", "answer": 116})
    wrong = env.step(Turn(text="115"))
    assert wrong.done and wrong.reward == 0.0 and not wrong.info["success"]


def test_calculator_tool_call_returns_the_product() -> None:
    env = CalculatorEnvironment()
    env.reset({"question": "What is 7 * 13 + 25?", "answer": 116})
    step = env.step(tool_turn("multiply", a=7, b=13))
    assert not step.done and not step.reward
    assert len(step.messages) == 1 and step.messages[0]["role"] == "tool"
    assert json.loads(step.messages[0]["content"]) == 91


@pytest.mark.parametrize("file_type", ["jsonl", "parquet"])
def test_calculator_files(tmp_path: Path, file_type: str) -> None:
    paths = calculator.write_datasets(tmp_path, num_sft=30, num_tasks=20, num_eval=10, seed=3, file_type=file_type)
    assert sorted(paths) == ["prompts_eval", "prompts_train", "sft_eval", "sft_train"]
    assert all(p.endswith(f".{file_type}") for p in paths.values())
    counts = {"sft_train": 30, "sft_eval": 10, "prompts_train": 20, "prompts_eval": 10}
    rows = {name: read_rows(path) for name, path in paths.items()}
    for name, count in counts.items():
        assert len(rows[name]) == count, name
    for row in rows["sft_train"] + rows["sft_eval"]:
        assert set(row) == {"messages", "tools"}
        assert json.loads(row["tools"]) == calculator.tool_schemas()
        assert row["messages"][-1]["content"] == str(calculator.parse_question(row["messages"][0]["content"]).answer)
    for row in rows["prompts_train"] + rows["prompts_eval"]:
        assert set(row) == {"question", "answer", "prompt"}
        assert isinstance(row["answer"], int) and row["prompt"] == row["question"]
        assert calculator.parse_question(row["question"]).answer == row["answer"]
    eval_questions = [r["question"] for r in rows["prompts_eval"]]
    assert [r["messages"][0]["content"] for r in rows["sft_eval"]] == eval_questions
    again = calculator.write_datasets(tmp_path / "again", num_sft=30, num_tasks=20, num_eval=10, seed=3,
                                      file_type=file_type)
    assert all(read_rows(again[name]) == rows[name] for name in paths)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_calculator_held_out_problems_are_disjoint(tmp_path: Path, seed: int) -> None:
    paths = calculator.write_datasets(tmp_path, num_sft=500, num_tasks=2000, num_eval=300, seed=seed)
    train = {r["question"] for r in read_rows(paths["prompts_train"])}
    train |= {r["messages"][0]["content"] for r in read_rows(paths["sft_train"])}
    held_out = {r["question"] for r in read_rows(paths["prompts_eval"])}
    assert len(held_out) == 300 and not train & held_out
    pool_train, pool_eval = calculator.split_problems(seed)
    assert not set(pool_train) & set(pool_eval)
    assert len(pool_train) + len(pool_eval) == 18 * 18 * 99


# ---------------------------------------------------------------- guess


@pytest.mark.parametrize("secret", range(1, 9))
def test_guess_demonstrations_succeed(secret: int) -> None:
    messages = guess.demonstration(guess.task_row(secret))
    assert messages[0] == {"role": "user", "content": "I picked a number from 1 to 8. Guess it."}
    roles = [m["role"] for m in messages]
    assert roles[1::2] == ["assistant"] * len(roles[1::2]) and roles[2::2] == ["user"] * len(roles[2::2])
    assert roles[-1] == "assistant" and len(roles[1::2]) <= 4
    assert messages[1]["content"] == "4" and messages[-1]["content"] == str(secret)
    env = GuessEnvironment()
    env.reset(guess.task_row(secret))
    steps = [env.step(Turn(text=m["content"])) for m in messages if m["role"] == "assistant"]
    assert steps[-1].done and steps[-1].reward == 1.0 and steps[-1].info == {"success": 1.0, "guesses": 1.0}


def test_guess_replies_higher_or_lower() -> None:
    env = GuessEnvironment()
    assert env.tools() is None
    assert env.reset({"secret": 6}) == [{"role": "user", "content": "I picked a number from 1 to 8. Guess it."}]
    step = env.step(Turn(text="4"))
    assert step.messages == [{"role": "user", "content": "higher"}]
    assert step.reward is None and not step.done and step.info == {"guesses": 1.0}
    step = env.step(Turn(text="I guess 7"))
    assert step.messages == [{"role": "user", "content": "lower"}] and not step.done
    step = env.step(Turn(text="6"))
    assert step.messages == [] and step.done and step.reward == 1.0 and step.info["success"] == 1.0


def test_guess_ends_after_max_guesses() -> None:
    env = GuessEnvironment(max_guesses=3)
    env.reset({"secret": 2, "low": 1, "high": 8})
    step = env.step(Turn(text="no idea"))
    assert step.messages == [{"role": "user", "content": "Say a number."}]
    assert step.info == {"invalid_guesses": 1.0} and not step.done
    assert env.step(Turn(text="5")).messages == [{"role": "user", "content": "lower"}]
    last = env.step(Turn(text="1"))
    assert last.done and last.reward == 0.0 and last.messages == []
    assert last.info == {"success": 0.0, "guesses": 1.0}
    env.reset({"secret": 2})  # reset starts the count again
    assert not env.step(Turn(text="1")).done


def test_guess_files(tmp_path: Path) -> None:
    paths = guess.write_datasets(tmp_path, num_sft=40, num_tasks=25, num_eval=12, seed=5)
    assert all(p.endswith(".jsonl") for p in paths.values())
    rows = {name: read_rows(path) for name, path in paths.items()}
    assert {name: len(r) for name, r in rows.items()} == {"sft_train": 40, "sft_eval": 12, "prompts_train": 25,
                                                          "prompts_eval": 12}
    for row in rows["sft_train"] + rows["sft_eval"]:
        assert set(row) == {"messages"}
    for row in rows["prompts_train"] + rows["prompts_eval"]:
        assert set(row) == {"secret", "low", "high", "prompt"}
        assert 1 <= row["secret"] <= 8 and (row["low"], row["high"]) == (1, 8)
        assert row["prompt"] == "I picked a number from 1 to 8. Guess it."
    secrets = [r["secret"] for r in rows["prompts_eval"]]
    assert [int(r["messages"][-1]["content"]) for r in rows["sft_eval"]] == secrets


# ---------------------------------------------------------------- chat template


@pytest.fixture(scope="module")
def demo_tokenizer():
    from pipelines.tasks.tiny_model import build_bpe_tokenizer

    rng = random.Random(0)
    tasks = [Problem(rng.choice(calculator.FACTORS), rng.choice(calculator.FACTORS), rng.choice(calculator.OFFSETS))
             for _ in range(200)]
    corpus = [m["content"] for p in tasks for m in calculator.demonstration(p.task())]
    corpus += [m["content"] for s in range(1, 9) for m in guess.demonstration(guess.task_row(s))]
    corpus.append(json.dumps(calculator.tool_schemas()))
    return build_bpe_tokenizer(corpus, vocab_size=512, model_max_length=512)


def test_demonstrations_render_with_tools(demo_tokenizer) -> None:
    messages = calculator.demonstration(Problem(7, 13, 25).task())
    text = demo_tokenizer.apply_chat_template(messages, tools=calculator.tool_schemas(), tokenize=False)
    assert text.startswith("<|im_start|>system\nTools: add(a, b) multiply(a, b)<|im_end|>\n"
                           "<|im_start|>user\nWhat is 7 * 13 + 25?<|im_end|>\n<|im_start|>assistant\n<tool_call>")
    assert "<|im_start|>tool\n91<|im_end|>" in text and text.endswith("<|im_start|>assistant\n116<|im_end|>\n")
    ids = demo_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert demo_tokenizer.decode(ids) == text and len(ids) < 256  # ~150 with a 512-token vocabulary
    plain = demo_tokenizer.apply_chat_template(guess.demonstration(guess.task_row(8)), tokenize=False)
    assert plain.startswith("<|im_start|>user\nI picked a number from 1 to 8. Guess it.<|im_end|>")
