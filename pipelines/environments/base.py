"""The environment interface of multi-turn, tool-using rollouts (``environment:`` in an online stage).

An environment is a plain Python class named in the YAML as ``module:Class`` (built with the YAML's
``kwargs``), one instance per trajectory:

- ``reset(task) -> messages``: the conversation the policy starts from, for one task (a row of the
  stage's task file, as a dict of its columns).
- ``step(turn) -> Step``: the policy's turn (its text, its parsed tool calls, its token ids) in;
  the messages the environment answers with (tool results, a user's reply), a reward or None, and
  whether the trajectory is done, out.
- ``tools() -> list of JSON schemas | None``: what the chat template is given as ``tools=``
  (``ToolEnvironment`` derives them from typed Python functions; None: no tools).

A trajectory's reward is the sum of its steps' rewards. ``Step.info`` holds numbers the stage
averages into ``env/*`` metrics; ``success`` (0 or 1) is the one ``env/success_rate`` and
``eval/success_rate`` read. An environment never sees token ids it must re-encode: the rollout
appends its messages as the tokens the chat template adds (``pipelines.environments.tokens``).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pipelines.errors import ConfigError

Message = dict[str, Any]  # {"role": ..., "content": ...}


@dataclass(frozen=True)
class ToolCall:
    """One tool call the policy emitted: the tool's name and its arguments."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Turn:
    """The policy's turn as the environment sees it.

    Fields:
        text: the decoded turn (special tokens skipped).
        token_ids: the sampled token ids (EOS included when the turn stopped on it).
        tool_calls: the well-formed tool calls in ``text`` (``tools.parse_tool_calls``).
        malformed: one message per tool call that could not be parsed (the environment answers it).
    """

    text: str
    token_ids: tuple[int, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    malformed: tuple[str, ...] = ()


@dataclass
class Step:
    """An environment's answer to a turn: ``messages`` appended to the conversation (none when
    ``done``), ``reward`` (None: nothing yet), ``done``, and ``info`` numbers (``success``,
    ``tool_calls``, ``tool_errors``, ... summed over the trajectory's steps)."""

    messages: list[Message] = field(default_factory=list)
    reward: float | None = None
    done: bool = False
    info: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """One trajectory's environment (see the module docstring)."""

    def reset(self, task: dict[str, Any]) -> list[Message]: ...

    def step(self, turn: Turn) -> Step: ...

    def tools(self) -> list[dict[str, Any]] | None: ...


def load_object(spec: str, what: str, *, error: type[Exception] = ConfigError, form: str = "module:Class") -> Any:
    """Import ``module:attribute`` (a reward function, an environment class); errors of type
    ``error`` name ``what`` (the YAML field or the spec) and what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise error(f"{what}: expected '{form}'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise error(f"{what}: cannot import module {module_name!r} ({exc})") from None
    if not hasattr(module, attr):
        raise error(f"{what}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


@dataclass(frozen=True)
class EnvironmentFactory:
    """Builds one environment per trajectory from ``module:Class`` and keyword arguments; picklable
    (only the names travel to the environment actors)."""

    cls: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def load(self) -> type:
        found = load_object(self.cls, "environment.cls")
        if not inspect.isclass(found) or not issubclass(found, Environment):
            raise ConfigError(f"environment.cls: {self.cls!r} is not a class with reset(task), step(turn) and "
                              "tools() (None when it has no tools)")
        return found

    def __call__(self) -> Environment:
        try:
            return self.load()(**dict(self.kwargs))
        except TypeError as exc:
            raise ConfigError(f"environment.kwargs: {self.cls} rejects them ({exc})") from None

    def tools(self) -> list[dict[str, Any]] | None:
        """The JSON schemas the chat template is given (None: the environment has no tools)."""
        return self().tools()
