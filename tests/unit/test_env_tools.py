"""Tool calls in text (parse, render), tool schemas, and ToolEnvironment.step's answers and error policy."""

from __future__ import annotations

import time

import pytest

from pipelines.environments.base import Environment, Step, ToolCall, Turn
from pipelines.environments.tools import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ToolEnvironment,
    parse_tool_calls,
    render_tool_call,
    tool_schema,
)
from pipelines.errors import ConfigError


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first term.
        b: the second term.
    """
    return a + b


def fail(message: str) -> str:
    """Raise a ValueError.

    Args:
        message: the error's message.
    """
    raise ValueError(message)


def nap(seconds: float) -> str:
    """Sleep, then say so.

    Args:
        seconds: how long to sleep.
    """
    time.sleep(seconds)
    return "awake"


def opaque() -> object:
    """Return an object JSON cannot encode."""
    return {1, 2}


class AddEnv(ToolEnvironment):
    """Answer with the sum of the task's two numbers."""

    def __init__(self, **kwargs):
        super().__init__([add, fail, nap, opaque], **kwargs)
        self.expected = "3"

    def reset(self, task):
        self.expected = str(task["a"] + task["b"])
        return [{"role": "user", "content": f"{task['a']}+{task['b']}="}]

    def answer(self, text):
        ok = text.strip() == self.expected
        return (1.0 if ok else 0.0), ok


def turn_of(*calls: ToolCall, text: str = "") -> Turn:
    text = text + "".join(render_tool_call(c) for c in calls)
    parsed, malformed = parse_tool_calls(text)
    return Turn(text=text, tool_calls=tuple(parsed), malformed=tuple(malformed))


# --- parse / render ---------------------------------------------------------------------------------


def test_parse_one_and_two_calls():
    text = 'I will add. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> done'
    assert parse_tool_calls(text) == ([ToolCall("add", {"a": 1, "b": 2})], [])
    two = '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>x<tool_call>{"name": "nap"}</tool_call>'
    assert parse_tool_calls(two) == ([ToolCall("add", {"a": 1}), ToolCall("nap", {})], [])
    assert parse_tool_calls("no calls here") == ([], [])


def test_parse_malformed_json():
    calls, errors = parse_tool_calls('<tool_call>{"name": "add" "arguments": {}}</tool_call>')
    assert calls == []
    assert errors == ["malformed tool call 1: invalid JSON (Expecting ',' delimiter at char 15)"]


def test_parse_missing_closing_tag():
    text = '<tool_call>{"name": "add", "arguments": {}}</tool_call><tool_call>{"name": "add"'
    calls, errors = parse_tool_calls(text)
    assert calls == [ToolCall("add", {})]
    assert errors == ["malformed tool call 2: no closing </tool_call>"]
    # An open tag followed by another before any close: the first is unclosed, the second still parses.
    calls, errors = parse_tool_calls('<tool_call>{"name": "x"<tool_call>{"name": "add"}</tool_call>')
    assert calls == [ToolCall("add", {})]
    assert errors == ["malformed tool call 1: no closing </tool_call>"]


@pytest.mark.parametrize(
    "body,message",
    [
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"arguments": {}}', '"name" must be a non-empty string'),
        ('{"name": 3, "arguments": {}}', '"name" must be a non-empty string'),
        ('{"name": "add", "arguments": [1, 2]}', '"arguments" of add must be a JSON object, got list'),
        ('{"name": "add", "arguments": "{}"}', '"arguments" of add must be a JSON object, got str'),
    ],
)
def test_parse_wrong_types(body, message):
    calls, errors = parse_tool_calls(f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}")
    assert calls == []
    assert errors == [f"malformed tool call 1: {message}"]


def test_render_canonical_and_round_trip():
    call = ToolCall("add", {"a": 1, "b": 2})
    assert render_tool_call(call) == '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    tags = ToolCall("g", {"z": [1, {"y": None}], "a": "ü </tool_call>\"x", "b": "<tool_call>"})
    assert render_tool_call(tags).count("<") == 2  # tags inside strings are escaped
    for call in [call, ToolCall("f", {}), tags]:
        calls, errors = parse_tool_calls(render_tool_call(call))
        assert (calls, errors) == ([call], [])
        assert list(calls[0].arguments) == list(call.arguments)  # argument order preserved


# --- tool_schema --------------------------------------------------------------------------------------


def test_tool_schema_of_typed_documented_function():
    schema = tool_schema(add)
    assert schema["type"] == "function"
    fn = schema["function"]
    assert fn["name"] == "add"
    assert fn["description"] == "Add two integers."
    assert fn["parameters"]["properties"] == {
        "a": {"type": "integer", "description": "the first term."},
        "b": {"type": "integer", "description": "the second term."},
    }
    assert fn["parameters"]["required"] == ["a", "b"]
    assert tool_schema(nap)["function"]["parameters"]["properties"]["seconds"]["type"] == "number"


def untyped(a):
    """No hint.

    Args:
        a: something.
    """


def undocumented(a: int) -> int:
    return a


def undescribed(a: int) -> int:
    """No Args section."""
    return a


@pytest.mark.parametrize(
    "fn,missing",
    [(untyped, "missing a type hint"), (undocumented, "no docstring"), (undescribed, "no description")],
)
def test_tool_schema_errors_name_function_and_what_is_missing(fn, missing):
    with pytest.raises(ConfigError, match=f"tool {fn.__name__}: .*{missing}"):
        tool_schema(fn)


def test_environment_config_errors():
    with pytest.raises(ConfigError, match="tool untyped"):
        ToolEnvironment([add, untyped])
    with pytest.raises(ConfigError, match="two tools are named 'add'"):
        ToolEnvironment([add, add])
    with pytest.raises(ConfigError, match="tool_timeout_s"):
        ToolEnvironment([add], tool_timeout_s=0)
    with pytest.raises(ConfigError, match="max_calls_per_turn"):
        ToolEnvironment([add], max_calls_per_turn=0)


# --- ToolEnvironment ------------------------------------------------------------------------------------


def test_subclass_is_an_environment_and_base_is_abstract():
    env = AddEnv()
    assert isinstance(env, Environment)
    assert [t["function"]["name"] for t in env.tools()] == ["add", "fail", "nap", "opaque"]
    assert env.reset({"a": 2, "b": 5}) == [{"role": "user", "content": "2+5="}]
    base = ToolEnvironment([add])
    with pytest.raises(NotImplementedError):
        base.reset({})
    with pytest.raises(NotImplementedError):
        base.step(Turn(text="7"))


def test_successful_call():
    step = AddEnv().step(turn_of(ToolCall("add", {"a": 1, "b": 2}), text="let me add "))
    assert step == Step(
        [{"role": "tool", "content": "3"}], None, False,
        {"tool_calls": 1.0, "tool_errors": 0.0, "malformed_tool_calls": 0.0},
    )


def test_int_coercion_and_non_json_result():
    env = AddEnv()
    step = env.step(turn_of(ToolCall("add", {"a": 1.0, "b": " 41"}), ToolCall("opaque", {})))
    assert [m["content"] for m in step.messages] == ["42", "{1, 2}"]
    assert step.info["tool_errors"] == 0.0
    # A non-integral float is passed as given.
    assert env.step(turn_of(ToolCall("add", {"a": 1.5, "b": 1}))).messages[0]["content"] == "2.5"


def test_unknown_tool():
    step = AddEnv().step(turn_of(ToolCall("mul", {"a": 1})))
    assert step.messages == [
        {"role": "tool", "content": "error: unknown tool 'mul'; available tools: add, fail, nap, opaque"}
    ]
    assert step.info["tool_errors"] == 1.0 and not step.done and step.reward is None


def test_bad_arguments():
    env = AddEnv()
    step = env.step(turn_of(ToolCall("add", {"a": 1}), ToolCall("add", {"a": 1, "b": 2, "c": 3})))
    assert [m["content"] for m in step.messages] == [
        "error: bad arguments for add: missing a required argument: 'b'",
        "error: bad arguments for add: got an unexpected keyword argument 'c'",
    ]
    assert step.info == {"tool_calls": 2.0, "tool_errors": 2.0, "malformed_tool_calls": 0.0}


def test_raising_tool():
    step = AddEnv().step(turn_of(ToolCall("fail", {"message": "bad input"})))
    assert step.messages == [{"role": "tool", "content": "error: ValueError: bad input"}]
    assert step.info["tool_errors"] == 1.0


def test_tool_over_deadline_is_abandoned():
    env = AddEnv(tool_timeout_s=0.2)
    start = time.monotonic()
    step = env.step(turn_of(ToolCall("nap", {"seconds": 3}), ToolCall("add", {"a": 2, "b": 2})))
    elapsed = time.monotonic() - start
    assert elapsed < 1.5
    assert [m["content"] for m in step.messages] == ["error: tool nap timed out after 0.2s", "4"]
    assert step.info == {"tool_calls": 2.0, "tool_errors": 1.0, "malformed_tool_calls": 0.0}
    assert env.step(turn_of(ToolCall("nap", {"seconds": 0}))).messages[0]["content"] == '"awake"'


def test_too_many_calls():
    env = AddEnv(max_calls_per_turn=2)
    step = env.step(turn_of(*(ToolCall("add", {"a": i, "b": 0}) for i in range(4))))
    too_many = "error: too many tool calls in one turn (max 2)"
    assert [m["content"] for m in step.messages] == ["0", "1", too_many, too_many]
    assert step.info == {"tool_calls": 4.0, "tool_errors": 2.0, "malformed_tool_calls": 0.0}


def test_malformed_calls_answered_after_well_formed_ones():
    text = '<tool_call>{"name": "add" }}</tool_call><tool_call>{"name": "add", "arguments": {"a": 1, "b": 1}}'
    text += "</tool_call><tool_call>{"
    calls, malformed = parse_tool_calls(text)
    step = AddEnv().step(Turn(text=text, tool_calls=tuple(calls), malformed=tuple(malformed)))
    assert [m["content"] for m in step.messages] == [
        "2",
        "error: malformed tool call 1: invalid JSON (Extra data at char 16)",
        "error: malformed tool call 3: no closing </tool_call>",
    ]
    assert step.info == {"tool_calls": 1.0, "tool_errors": 0.0, "malformed_tool_calls": 2.0}
    assert not step.done and step.reward is None


def test_final_answer_goes_to_answer():
    env = AddEnv()
    env.reset({"a": 20, "b": 22})
    assert env.step(Turn(text=" 42\n")) == Step(
        [], 1.0, True, {"success": 1.0, "tool_calls": 0.0, "tool_errors": 0.0, "malformed_tool_calls": 0.0}
    )
    step = env.step(Turn(text="41"))
    assert (step.reward, step.done, step.info["success"]) == (0.0, True, 0.0)
