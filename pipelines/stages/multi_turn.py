"""Multi-turn rollouts in an environment (``environment:``): the online loop's sampler when a stage
trains on trajectories instead of single completions.

Turn-synchronous: every live trajectory of the batch samples its next turn in one generation call
over the rollout workers (vLLM batches them), then every environment answers in one call per
environment worker, each trajectory's environment staying on the worker that created it; then the
next turn. A trajectory's token ids grow by the tokens the engine sampled (``loss_mask`` 1, with
their log-probs) and by the chat template's tokens for the environment's messages (``loss_mask`` 0;
``pipelines.environments.tokens``): nothing is re-rendered, so ``rollout/token_mismatch`` (sampled
tokens that differ from the trained ones, counted over every turn) is 0.

A trajectory ends when its environment says done, when a turn stops without EOS (``length``), after
``environment.max_turns`` turns, or when another turn could pass ``environment.max_total_tokens``.
An environment that raises or times out fails its trajectory; a failed trajectory is played again
once, with a fresh environment; a group (the K trajectories of one task) with a trajectory that
failed twice is dropped: its samples stay in the batch (its size is fixed) with every loss-mask
token 0 and equal rewards, so nothing of a partial group is trained on (``env/groups_dropped``).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from actors.environment import EnvFailure, EnvironmentWorker
from actors.rollout import RolloutSample, SamplingSpec
from orchestrator.runtime.rollout_ops import generate
from pipelines.data import sources
from pipelines.environments.base import Message, Step, Turn
from pipelines.environments.tokens import ChatTokens
from pipelines.environments.tools import parse_tool_calls
from pipelines.errors import DataError
from pipelines.stages.online import EnvironmentConfig, OnlineStage
from pipelines.stages.online_rollout import OnlineRoles, Prompts
from pipelines.stages.rollout_queue import Generated
from pipelines.stages.timeline import ScoredAlready

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import ActorGroup


@dataclass
class Trajectory:
    """One trajectory being played: its conversation as text (for the template) and as token ids."""

    key: str
    group: int
    task: dict[str, Any]
    messages: list[Message] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: list[list[int]] = field(default_factory=list)
    sampled: list[list[int]] = field(default_factory=list)  # each turn's ids as the engine returned them
    versions: set[int] = field(default_factory=set)
    reward: float = 0.0
    info: dict[str, float] = field(default_factory=dict)
    finish: str | None = None  # None while live
    failure: str | None = None

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def add(self, ids: list[int], logprobs: list[float] | None) -> None:
        """Append tokens: the sampler's (with their log-probs) or the environment's (None)."""
        if logprobs is not None:
            self.turns.append([len(self.response_ids), len(self.response_ids) + len(ids)])
            self.sampled.append(list(ids))
        self.response_ids += ids
        self.mask += [int(logprobs is not None)] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)

    def take(self, step: Step) -> None:
        self.reward += step.reward or 0.0
        for name, value in step.info.items():
            self.info[name] = self.info.get(name, 0.0) + float(value)

    def mismatches(self) -> int:
        """Sampled tokens that differ from the tokens at their span of the trained sequence, and
        tokens whose loss mask disagrees with the spans (0 when the trajectory was built right)."""
        wrong = sum(a != b for (s, e), ids in zip(self.turns, self.sampled, strict=True)
                    for a, b in zip(self.response_ids[s:e], ids, strict=True))
        spans = [0] * len(self.response_ids)
        for s, e in self.turns:
            spans[s:e] = [1] * (e - s)
        return wrong + sum(a != b for a, b in zip(spans, self.mask, strict=True))


class EnvPool:
    """The environments of a batch: on the environment group's actors (each trajectory on one rank,
    from its reset to its end), or in the driver (``env_group.num_workers: 0``, one after another)."""

    def __init__(self, group: ActorGroup | None, env: EnvironmentConfig) -> None:
        self.group = group
        local = group is None
        self.local = EnvironmentWorker(0, 1, env.factory(), call_timeout_s=env.call_timeout_s) if local else None
        self.rank_of: dict[str, int] = {}
        self.seconds = 0.0
        self.span: list[float] = []

    def reset(self, items: list[tuple[str, dict[str, Any]]]) -> list[list[Message] | EnvFailure]:
        ranks = self.group.num_workers if self.group is not None else 1
        for i, (key, _) in enumerate(items):
            self.rank_of[key] = i % ranks
        return self._call(EnvironmentWorker.reset_chunk, items)

    def step(self, items: list[tuple[str, Turn]]) -> list[Step | EnvFailure]:
        return self._call(EnvironmentWorker.step_chunk, items)

    def close(self, keys: list[str]) -> None:
        if keys:
            self._call(EnvironmentWorker.close, [(k, None) for k in keys], keys_only=True)

    def _call(self, method: Callable[..., list[Any]], items: Sequence[tuple[str, Any]], keys_only: bool = False
              ) -> list[Any]:
        start = time.perf_counter()
        if self.local is not None:
            out = method(self.local, [k for k, _ in items] if keys_only else list(items))
        else:
            shards: list[list[Any]] = [[] for _ in range(self.group.num_workers)]
            where: list[tuple[int, int]] = []
            for key, value in items:
                rank = self.rank_of[key]
                where.append((rank, len(shards[rank])))
                shards[rank].append(key if keys_only else (key, value))
            results = self.group.shard(method, shards)
            out = None if keys_only else [results[rank][i] for rank, i in where]
        end = time.perf_counter()
        self.seconds += end - start
        self.span = [self.span[0] if self.span else start, end]
        return out or []


class MultiTurn:
    """The online loop's ``Sampler`` over an environment: K trajectories per task, rewarded by it."""

    def __init__(self, env: EnvironmentConfig, rollout: ActorGroup, environments: ActorGroup | None, tokenizer: Any,
                 tasks: list[dict[str, Any]], *, samples_per_prompt: int, sampling: SamplingSpec,
                 prompts_per_chunk: int, seed: int) -> None:
        self.env, self.rollout, self.environments = env, rollout, environments
        tools = env.factory().tools()
        self.chat = ChatTokens(tokenizer, tools, where="environment")
        self.parse = parse_tool_calls if tools else None
        self.tokenizer, self.tasks, self.k = tokenizer, tasks, samples_per_prompt
        self.sampling, self.per_chunk, self.seed = sampling, prompts_per_chunk, seed
        self._spans: dict[int, list[tuple[str, float, float]]] = {}

    @classmethod
    def of(cls, cfg: OnlineStage, roles: OnlineRoles, tokenizer: Any, tasks: Prompts) -> MultiTurn:
        """The sampler of an online stage with an ``environment``."""
        assert cfg.environment is not None
        c = cfg.sampling
        spec = SamplingSpec(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p)
        return cls(cfg.environment, roles.rollout, roles.environment, tokenizer, tasks.fields,
                   samples_per_prompt=c.samples_per_prompt, sampling=spec,
                   prompts_per_chunk=cfg.rollout.prompts_per_chunk, seed=cfg.schedule.seed)

    def generate(self, iteration: int, chosen: list[int]) -> Generated:
        start = time.perf_counter()
        sampling = replace(self.sampling, seed=(self.seed * 100_003 + iteration) * 1_000_003)
        samples, metrics, pool = self.play([self.tasks[i] for i in chosen], self.k, iteration, sampling)
        rewards = [s.reward or 0.0 for s in samples]
        if pool.span:
            self._spans[iteration] = [("env", *pool.span)]
        return samples, ScoredAlready(rewards, None, start, time.perf_counter()), None, metrics

    def evaluate(self, tasks: list[dict[str, Any]], max_new_tokens: int | None) -> dict[str, float]:
        """One greedy trajectory per held-out task (``eval/success_rate``, reward, turns, tool calls)
        and 4 sampled as the stage samples, with a fixed seed (``eval/sampled_success_rate``: what
        the stage's objective rewards, on tasks it does not train on)."""
        new = max_new_tokens or self.sampling.max_new_tokens
        samples, metrics, _ = self.play(tasks, 1, -1, replace(self.sampling, temperature=0.0, seed=None,
                                                               max_new_tokens=new))
        out = {f"eval/{name[4:]}": metrics[name] for name in ("env/success_rate", "env/reward_mean",
                                                               "env/turns_mean", "env/tool_calls_mean")}
        _, sampled, _ = self.play(tasks, 4, -2, replace(self.sampling, seed=self.seed * 1_000_003 + 17,
                                                        max_new_tokens=new))
        return out | {"eval/response_length_mean": sum(sum(s.sampled_mask()) for s in samples) / len(samples),
                      "eval/sampled_success_rate": sampled["env/success_rate"],
                      "eval/env_errors": metrics["env/errors"] + sampled["env/errors"]}

    def judge(self, greedy: SamplingSpec, sampled: SamplingSpec) -> dict[str, Any]:
        """The ``evaluate`` stage's results of the served policy on every task: one greedy trajectory
        and K sampled ones each, their rewards and successes (its ``checks``)."""
        runs = {mode: self.play(self.tasks, k, 0, spec)[0] for mode, k, spec in (("greedy", 1, greedy),
                                                                                  ("sampled", self.k, sampled))}
        out: dict[str, Any] = {}
        for mode, prefix in (("greedy", "greedy_"), ("sampled", "")):
            out |= {mode: runs[mode], f"{prefix}rewards": [float(x.reward or 0.0) for x in runs[mode]],
                    f"{prefix}checks": [(x.info or {}).get("success", 0.0) for x in runs[mode]]}
        return out

    def spans(self, iteration: int) -> list[tuple[str, float, float]]:
        """The environment's span of the batch of ``iteration`` (from its first call to its last)."""
        return self._spans.pop(iteration, [])

    def play(self, tasks: list[dict[str, Any]], k: int, iteration: int, sampling: SamplingSpec
             ) -> tuple[list[RolloutSample], dict[str, float], EnvPool]:
        """K trajectories of each task (grouped by task), each failed one played again once; the
        samples (a dropped group's masked out) and the ``env/*`` and ``rollout/token_mismatch`` metrics."""
        pool = EnvPool(self.environments, self.env)
        trajs = [Trajectory(f"{iteration}.{g}.{j}.0", g, task) for g, task in enumerate(tasks) for j in range(k)]
        self.run(trajs, pool, sampling, 0)
        failed = [i for i, t in enumerate(trajs) if t.failure is not None]
        retried = [Trajectory(trajs[i].key[:-1] + "1", trajs[i].group, trajs[i].task) for i in failed]
        if retried:  # a fresh environment, other random numbers
            self.run(retried, pool, sampling, 50_000_000)
        errors = [trajs[i].failure for i in failed] + [t.failure for t in retried if t.failure is not None]
        for i, again in zip(failed, retried, strict=True):
            trajs[i] = again
        dropped = sorted({t.group for t in trajs if t.failure is not None})
        samples = [self.sample(t, t.group in dropped) for t in trajs]
        metrics = trajectory_metrics(trajs, dropped)  # + the mismatches counted once per trajectory, in sample()
        metrics["rollout/token_mismatch"] = sum((s.info or {})["token_mismatch"] for s in samples)
        metrics |= {"env/errors": float(len(errors)), "env/retries": float(len(retried)),
                    "env/groups_dropped": float(len(dropped)), "timing/env_s": pool.seconds}
        return samples, metrics, pool

    def run(self, trajs: list[Trajectory], pool: EnvPool, sampling: SamplingSpec, seed_offset: int) -> None:
        """Play ``trajs`` from their reset to their end, turn by turn."""
        for t, first in zip(trajs, pool.reset([(t.key, t.task) for t in trajs]), strict=True):
            if isinstance(first, EnvFailure):
                t.failure = f"reset: {first.reason}"
            else:
                t.messages, t.prompt_ids = list(first), self.chat.prompt(first)
                self._over_budget(t)
        for turn in range(self.env.max_turns):
            live = [t for t in trajs if t.finish is None and t.failure is None]
            if not live:
                break
            seed = None if sampling.seed is None else sampling.seed + seed_offset + turn * 100_003
            spec = SamplingSpec(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                top_p=sampling.top_p, n=1, seed=seed)
            answered = generate(self.rollout, [t.ids for t in live], spec, self.per_chunk)
            stepping = []
            for t, s in zip(live, answered, strict=True):
                t.add(list(s.response_ids), list(s.logprobs))
                t.versions.add(s.policy_version)
                t.messages.append({"role": "assistant", "content": s.text})
                if s.finish_reason == "length":  # no EOS: the template's turn end was never sampled
                    t.finish = "length"
                    continue
                calls, malformed = self.parse(s.text) if self.parse is not None else ([], [])
                stepping.append((t, Turn(s.text, tuple(s.response_ids), tuple(calls), tuple(malformed))))
            steps = pool.step([(t.key, turn_) for t, turn_ in stepping])
            for (t, _), step in zip(stepping, steps, strict=True):
                self._answer(t, step)
        for t in trajs:
            if t.finish is None and t.failure is None:
                t.finish = "max_turns"
        # environments still open: out of turns, or cut at a token limit (done and failed ones are gone)
        pool.close([t.key for t in trajs if t.finish in ("max_turns", "length")])

    def _answer(self, t: Trajectory, step: Step | EnvFailure) -> None:
        if isinstance(step, EnvFailure):
            t.failure = f"step: {step.reason}"
            return
        t.take(step)
        if step.done:
            t.finish = "stop"
            return
        answer = self.chat.answer(t.messages, step.messages)
        if self._over_budget(t, len(answer)):
            return
        t.add(answer, None)
        t.messages += step.messages

    def _over_budget(self, t: Trajectory, more: int = 0) -> bool:
        """End ``t`` (``length``) when ``more`` tokens and another whole turn could pass ``max_total_tokens``."""
        if len(t.ids) + more + self.sampling.max_new_tokens > self.env.max_total_tokens:
            t.finish = "length"
        return t.finish == "length"

    def sample(self, t: Trajectory, dropped: bool) -> RolloutSample:
        """The trajectory as the trainer sees it; the text shows the environment's tokens in ⟦ ⟧."""
        text = self._marked(t)
        mask = [0] * len(t.mask) if dropped else list(t.mask)
        info = dict(t.info) | {"turns": float(len(t.turns)), "dropped": float(dropped),
                               "token_mismatch": float(t.mismatches())}
        version = max(t.versions) if t.versions else 0
        return RolloutSample(t.prompt_ids, t.response_ids, text, t.logprobs, t.finish or "failed", version,
                             loss_mask=mask, turns=t.turns, reward=0.0 if dropped else t.reward, info=info)

    def _marked(self, t: Trajectory) -> str:
        """The response decoded run by run of its loss mask, the environment's runs inside ⟦ ⟧."""
        parts = [self.tokenizer.decode([tok for tok, _ in run], skip_special_tokens=False)
                 for _, run in itertools.groupby(zip(t.response_ids, t.mask), key=lambda x: x[1])]
        starts_sampled = bool(t.mask[:1] == [1])
        return "".join(p if (i % 2 == 0) == starts_sampled else f"⟦{p}⟧" for i, p in enumerate(parts))


def trajectory_metrics(trajs: list[Trajectory], dropped: list[int]) -> dict[str, float]:
    """``env/*`` means over the kept trajectories."""
    kept = [t for t in trajs if t.group not in dropped] or trajs
    n = len(kept)

    def mean(name: str) -> float:
        return sum(t.info.get(name, 0.0) for t in kept) / n

    return {"env/turns_mean": sum(len(t.turns) for t in kept) / n, "env/tool_calls_mean": mean("tool_calls"),
            "env/tool_errors": sum(t.info.get("tool_errors", 0.0) + t.info.get("malformed_tool_calls", 0.0)
                                   for t in kept),
            "env/success_rate": mean("success"), "env/reward_mean": sum(t.reward for t in kept) / n,
            "env/truncated_rate": sum(t.finish == "length" for t in kept) / n}


def load_tasks(path: str, column: str, limit: int | None = None) -> Prompts:
    """An environment stage's tasks: every row of ``path`` as a dict of its columns (what
    ``Environment.reset`` receives), shown in sample tables by its ``column`` (``data.column``) or as JSON."""
    names = sources.column_names(path, "tasks")
    rows = sources.read_columns(path, names, "tasks", limit=limit)
    tasks = [dict(zip(names, values, strict=True)) for values in zip(*(rows[n] for n in names), strict=True)]
    if not tasks:
        raise DataError(f"{path}: no tasks")
    shown = [str(t[column]) if column in t else json.dumps(t, default=str)[:200] for t in tasks]
    return Prompts(tasks, shown, [])


def trajectory_columns(samples: list[RolloutSample]) -> dict[str, list[Any]]:
    """The sample table's columns of trajectories (none for single-turn samples): turns, tool calls,
    success, whether it was trained on (a dropped group's were not), policy tokens / all tokens."""
    if not samples or samples[0].info is None:
        return {}
    infos = [s.info or {} for s in samples]
    return {"turns": [int(i.get("turns", 0)) for i in infos],
            "tool_calls": [int(i.get("tool_calls", 0)) for i in infos],
            "success": [i.get("success", 0.0) for i in infos], "trained": [not i.get("dropped") for i in infos],
            "policy_tokens": [f"{sum(s.sampled_mask())}/{len(s.response_ids)}" for s in samples],
            "finish": [s.finish_reason for s in samples]}
