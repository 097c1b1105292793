"""The environment role: environments of multi-turn rollouts, one instance per trajectory, in actors
of their own (``env_group``), so a slow environment blocks neither the driver nor the engine.

Every ``reset`` and ``step`` runs under a deadline (``call_timeout_s``) in a thread of its own. A
call that raises or times out is answered as an ``EnvFailure`` for that trajectory, never raised
over the batch: the stage retries the trajectory once with a fresh environment and otherwise leaves
its whole group out. A timed-out call's thread cannot be killed; it is abandoned (a daemon thread)
with its environment instance. A replaced worker knows none of its predecessor's trajectories: their
next step answers ``EnvFailure`` too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.environments.base import Environment, EnvironmentFactory, Message, Step, Turn


@dataclass(frozen=True)
class EnvFailure:
    """A trajectory's environment raised, timed out, or is gone: ``reason`` says which, and where."""

    reason: str


def call_with_deadline(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """``fn()`` in a daemon thread; its result, or ``EnvFailure`` when it raises or runs past ``timeout_s``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except Exception as exc:  # an environment's own bug: reported, not raised over the batch
            box["error"] = f"{what} raised {type(exc).__name__}: {exc}"

    thread = threading.Thread(target=run, daemon=True, name=what)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return EnvFailure(f"{what} did not return within {timeout_s:g}s (environment.call_timeout_s)")
    if "error" in box:
        return EnvFailure(box["error"])
    return box["value"]


class EnvironmentWorker:
    """One rank of the environment group: the environments of the trajectories sent to it."""

    REPLACEABLE = True  # a dead rank is replaced; its trajectories fail and are retried
    STATELESS = True  # nothing outlives a rollout

    def __init__(self, rank: int, world_size: int, factory: EnvironmentFactory, *, call_timeout_s: float = 30.0
                 ) -> None:
        self.rank, self.world_size = rank, world_size
        self.factory, self.call_timeout_s = factory, call_timeout_s
        self.envs: dict[str, Environment] = {}

    def setup(self) -> dict[str, Any]:
        self.factory.load()  # an import error surfaces at setup, naming environment.cls
        return {"rank": self.rank}

    def reset_chunk(self, items: list[tuple[str, dict[str, Any]]]) -> list[list[Message] | EnvFailure]:
        """A fresh environment per (trajectory key, task), and its first messages."""
        out: list[list[Message] | EnvFailure] = []
        for key, task in items:
            self.envs.pop(key, None)
            env = call_with_deadline(self.factory, self.call_timeout_s, f"environment {self.rank}: construct")
            if isinstance(env, EnvFailure):
                out.append(env)
                continue
            messages = call_with_deadline(lambda env=env, task=task: env.reset(task), self.call_timeout_s,
                                          f"environment {self.rank}: reset")
            if not isinstance(messages, EnvFailure):
                self.envs[key] = env
                messages = _checked_messages(messages, "reset")
            out.append(messages)
        return out

    def step_chunk(self, items: list[tuple[str, Turn]]) -> list[Step | EnvFailure]:
        """Each trajectory's environment's answer to its policy turn; a finished one is closed."""
        out: list[Step | EnvFailure] = []
        for key, turn in items:
            env = self.envs.get(key)
            if env is None:
                out.append(EnvFailure(f"environment {self.rank}: no environment for trajectory {key} (its worker "
                                      "was replaced)"))
                continue
            start = time.perf_counter()
            step = call_with_deadline(lambda env=env, turn=turn: env.step(turn), self.call_timeout_s,
                                      f"environment {self.rank}: step")
            if isinstance(step, Step):
                step.info = {**step.info, "env_s": time.perf_counter() - start}
                checked = _checked_messages(step.messages, "step")
                step = step if not isinstance(checked, EnvFailure) else checked
            elif not isinstance(step, EnvFailure):
                step = EnvFailure(f"environment {self.rank}: step returned {type(step).__name__}, not a Step")
            if isinstance(step, EnvFailure) or step.done:
                self.envs.pop(key, None)
            out.append(step)
        return out

    def close(self, keys: list[str]) -> int:
        """Forget the environments of ``keys`` (trajectories cut short by the stage); how many were open."""
        return sum(self.envs.pop(k, None) is not None for k in keys)


def _checked_messages(messages: Any, call: str) -> list[Message] | EnvFailure:
    ok = isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                            and isinstance(m.get("content"), str) for m in messages)
    return messages if ok else EnvFailure(f"environment {call} returned {messages!r:.80}, not a list of "
                                          "{role, content} messages")
