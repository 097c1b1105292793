"""Tool calls in the policy's text, and ``ToolEnvironment``, the base class of tool-using environments.

The one format (Hermes/Qwen style): a tool call is the JSON object ``{"name": NAME, "arguments": {...}}``
between ``<tool_call>`` and ``</tool_call>`` in the assistant's text, e.g.
``<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>``. A turn may hold several;
text outside the tags is ignored. ``arguments`` may be left out (no arguments). The body ends at the first
``</tool_call>``, even inside a JSON string (``render_tool_call`` escapes ``<`` so its output never has one).

Tools are typed Python functions with Google-style docstrings; their JSON schemas (what the chat template
is given as ``tools=``) come from ``transformers.utils.get_json_schema``.

Error policy: nothing the policy writes makes ``step`` raise. A malformed call (invalid JSON, wrong types,
no closing tag), an unknown tool, arguments that do not bind to the tool's signature, an exception raised
by the tool, a tool over its deadline, or a call beyond ``max_calls_per_turn``: each is answered by a
``tool`` message whose content is ``"error: ..."``, so the model sees what went wrong, and each is
counted in ``Step.info`` (``tool_errors``, ``malformed_tool_calls``). Only configuration mistakes (a tool
without type hints or argument descriptions, two tools of one name) raise ``ConfigError``, when the
environment is built.

Deadline: each call runs in a daemon thread joined with ``tool_timeout_s``. A tool that overruns is
abandoned, not killed (Python cannot kill a thread): its thread runs on in the background and its result
is discarded; being a daemon thread, it does not keep the process alive.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
import typing
from collections.abc import Callable, Sequence
from typing import Any

from pipelines.environments.base import Message, Step, ToolCall, Turn
from pipelines.errors import ConfigError

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

_INT_STRING = re.compile(r"[+-]?\d+")


def _parse_one(body: str) -> ToolCall | str:
    """One tool call's JSON (the text between the tags): a ToolCall, or what is wrong with it."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        return f"invalid JSON ({exc.msg} at char {exc.pos})"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return '"name" must be a non-empty string'
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        return f'"arguments" of {name} must be a JSON object, got {type(arguments).__name__}'
    return ToolCall(name=name, arguments=arguments)


def parse_tool_calls(text: str) -> tuple[list[ToolCall], list[str]]:
    """Every ``<tool_call>...</tool_call>`` block of ``text``, in order.

    Args:
        text: the assistant's turn.

    Returns:
        The well-formed calls, and one error message per malformed block (``malformed tool call N: ...``,
        N counting all blocks from 1). A ``<tool_call>`` followed by another one before any
        ``</tool_call>``, or by none, is unclosed.
    """
    calls: list[ToolCall] = []
    errors: list[str] = []
    pos, index = 0, 0
    while (start := text.find(TOOL_CALL_OPEN, pos)) != -1:
        index += 1
        body_start = start + len(TOOL_CALL_OPEN)
        end = text.find(TOOL_CALL_CLOSE, body_start)
        next_open = text.find(TOOL_CALL_OPEN, body_start)
        if end == -1 or next_open != -1 and next_open < end:
            errors.append(f"malformed tool call {index}: no closing {TOOL_CALL_CLOSE}")
            pos = len(text) if next_open == -1 else next_open
            continue
        parsed = _parse_one(text[body_start:end].strip())
        if isinstance(parsed, ToolCall):
            calls.append(parsed)
        else:
            errors.append(f"malformed tool call {index}: {parsed}")
        pos = end + len(TOOL_CALL_CLOSE)
    return calls, errors


def render_tool_call(call: ToolCall) -> str:
    """The canonical text of a tool call (``parse_tool_calls`` reads it back to ``call``).

    ``json.dumps`` with its default separators; a ``<`` (only ever inside a JSON string) is written
    ``\\u003c``, so an argument holding a tag cannot end or split the call.
    """
    body = json.dumps({"name": call.name, "arguments": call.arguments}).replace("<", "\\u003c")
    return TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE


def _tool_name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or repr(fn)


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema of a tool, from its type hints and its Google-style docstring.

    Args:
        fn: a function whose every parameter has a type hint and a description under ``Args:``.

    Returns:
        ``{"type": "function", "function": {"name", "description", "parameters", ...}}``.

    Raises:
        ConfigError: the schema cannot be derived (names the function and what is missing).
    """
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as exc:  # transformers raises its own parsing exceptions, or TypeError
        raise ConfigError(
            f"tool {_tool_name(fn)}: cannot derive its JSON schema ({exc}); every parameter needs a type hint "
            "and a description under 'Args:' in a Google-style docstring"
        ) from None


def _coerce(arguments: dict[str, Any], hints: dict[str, Any]) -> dict[str, Any]:
    """Integral floats and digit strings given for ``int`` parameters become ints; the rest is unchanged."""
    out = dict(arguments)
    for key, value in arguments.items():
        if hints.get(key) is not int or isinstance(value, bool):
            continue
        if isinstance(value, float) and value.is_integer():
            out[key] = int(value)
        elif isinstance(value, str) and _INT_STRING.fullmatch(value.strip()):
            out[key] = int(value.strip())
    return out


def _to_content(result: Any) -> str:
    try:
        return json.dumps(result)
    except (TypeError, ValueError):
        return str(result)


def _run_with_deadline(fn: Callable[..., Any], bound: inspect.BoundArguments, timeout_s: float) -> tuple[bool, Any]:
    """Run ``fn`` in a daemon thread: ``(True, result)``, ``(False, exception)``, or ``(False, None)`` when
    the deadline passed (the thread is abandoned)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*bound.args, **bound.kwargs)
        except BaseException as exc:  # reported to the model, never raised
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"tool-{_tool_name(fn)}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return False, None
    if "error" in box:
        return False, box["error"]
    return True, box.get("result")


class ToolEnvironment:
    """Base class of tool-using environments (the ``Environment`` protocol of ``base``).

    Subclasses give ``reset(task)`` (the task's opening messages) and ``answer(text)`` (the score of a
    final answer); ``step`` runs the turn's tool calls, or hands a turn without any to ``answer``.
    """

    def __init__(
        self,
        tools: Sequence[Callable[..., Any]],
        *,
        tool_timeout_s: float = 5.0,
        max_calls_per_turn: int = 4,
    ) -> None:
        """Derive the tools' schemas once.

        Args:
            tools: typed, documented functions (see ``tool_schema``); their names are the tool names.
            tool_timeout_s: deadline of one call, in seconds.
            max_calls_per_turn: calls run per turn; the rest are answered with an error.

        Raises:
            ConfigError: a tool without a derivable schema, two tools of one name, or a non-positive limit.
        """
        if not tool_timeout_s > 0:
            raise ConfigError(f"tool_timeout_s must be > 0, got {tool_timeout_s!r}")
        if max_calls_per_turn < 1:
            raise ConfigError(f"max_calls_per_turn must be >= 1, got {max_calls_per_turn!r}")
        self.tool_timeout_s = float(tool_timeout_s)
        self.max_calls_per_turn = int(max_calls_per_turn)
        self._schemas: list[dict[str, Any]] = []
        self._tools: dict[str, Callable[..., Any]] = {}
        self._signatures: dict[str, inspect.Signature] = {}
        self._hints: dict[str, dict[str, Any]] = {}
        for fn in tools:
            schema = tool_schema(fn)
            name = schema["function"]["name"]
            if name in self._tools:
                raise ConfigError(f"two tools are named {name!r}; tool names must be unique")
            self._schemas.append(schema)
            self._tools[name] = fn
            self._signatures[name] = inspect.signature(fn)
            self._hints[name] = typing.get_type_hints(fn)

    def tools(self) -> list[dict[str, Any]]:
        """The tools' JSON schemas (what the chat template is given as ``tools=``)."""
        return list(self._schemas)

    def reset(self, task: dict[str, Any]) -> list[Message]:
        """The conversation the policy starts from, for one task (subclasses implement it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement reset(task)")

    def answer(self, text: str) -> tuple[float, bool]:
        """Score a final answer (a turn without any tool call): ``(reward, success)`` (subclasses)."""
        raise NotImplementedError(f"{type(self).__name__} must implement answer(text)")

    def call_tool(self, call: ToolCall) -> tuple[str, bool]:
        """Run one tool call: its tool message content, and whether it succeeded (errors never raise)."""
        fn = self._tools.get(call.name)
        if fn is None:
            available = ", ".join(self._tools) or "none"
            return f"error: unknown tool {call.name!r}; available tools: {available}", False
        try:
            bound = self._signatures[call.name].bind(**_coerce(call.arguments, self._hints[call.name]))
        except TypeError as exc:
            return f"error: bad arguments for {call.name}: {exc}", False
        ok, value = _run_with_deadline(fn, bound, self.tool_timeout_s)
        if ok:
            return _to_content(value), True
        if value is None:
            return f"error: tool {call.name} timed out after {self.tool_timeout_s:g}s", False
        return f"error: {type(value).__name__}: {value}", False

    def step(self, turn: Turn) -> Step:
        """Answer the turn's tool calls with tool messages, or score a turn without any via ``answer``.

        Args:
            turn: the policy's turn (``tool_calls`` and ``malformed`` as ``parse_tool_calls`` gives them).

        Returns:
            With tool calls: one ``tool`` message per well-formed call, in order, then one per malformed
            call; no reward, not done; ``info`` counts ``tool_calls`` (the well-formed ones), ``tool_errors``
            (those that failed, over-limit ones included) and ``malformed_tool_calls``. Without: no
            messages, ``answer``'s reward, done, and ``info["success"]``.
        """
        if not turn.tool_calls and not turn.malformed:
            reward, success = self.answer(turn.text)
            info = {"success": float(success), "tool_calls": 0.0, "tool_errors": 0.0, "malformed_tool_calls": 0.0}
            return Step([], float(reward), True, info)
        messages: list[Message] = []
        n_errors = 0
        for i, call in enumerate(turn.tool_calls):
            if i < self.max_calls_per_turn:
                content, ok = self.call_tool(call)
            else:
                content, ok = f"error: too many tool calls in one turn (max {self.max_calls_per_turn})", False
            n_errors += not ok
            messages.append({"role": "tool", "content": content})
        messages.extend({"role": "tool", "content": f"error: {error}"} for error in turn.malformed)
        info = {
            "tool_calls": float(len(turn.tool_calls)),
            "tool_errors": float(n_errors),
            "malformed_tool_calls": float(len(turn.malformed)),
        }
        return Step(messages, None, False, info)
