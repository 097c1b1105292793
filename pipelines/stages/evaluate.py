"""Stage ``evaluate``: several policies on the same held-out prompts, on the same footing.

Phases, per policy (one vLLM engine; each policy's checkpoint is loaded into it in turn, under the
weight sync's checks): ``generate`` (greedy, and K samples per prompt) → ``score`` (the reward role
on every response; the checker in the driver). Then ``ref_logprobs``: the reference policy's
checkpoint is loaded and scores every policy's sampled tokens, for the sampled KL to it. Then, in
the driver: per policy the mean reward, exact match (greedy), KL, response length, and the win rate
against the baseline policy judged by the reward (ties half) with a percentile-bootstrap interval
over prompts. Outputs: every generation with its scores (Parquet) and the comparison (JSON, and an
MLflow table); metrics ``eval/<policy>/<name>``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pyarrow.parquet as pq
import torch
from pydantic import Field, field_validator, model_validator

from actors.environment import EnvironmentWorker
from actors.reward import RewardSet
from actors.rollout import RolloutSample, RolloutWorker, SamplingSpec, checkpoint_shapes
from orchestrator.runtime.rollout_ops import generate, score
from pipelines.algorithms.evaluation import bootstrap_interval, exact_match, sampled_kl, win_rates
from pipelines.data.rewards import FunctionReward
from pipelines.data.tokens import load_tokenizer
from pipelines.errors import DataError
from pipelines.stages.base import Frozen, PathOrRef, ReadsFromStage, Registry, StageBase, StageKind, StageRef
from pipelines.stages.benchmarks import BenchmarksConfig, EvaluateRegistryConfig, promote, run_benchmarks
from pipelines.stages.config import PromptLengthFields, RewardConfig, RewardGroupConfig
from pipelines.stages.evaluate_records import generations_table
from pipelines.stages.multi_turn import MultiTurn, load_tasks
from pipelines.stages.online import EnvGroupConfig, EnvironmentConfig, RolloutConfig
from pipelines.stages.online_rollout import Prompts, load_prompts, spawn_rollout
from pipelines.stages.training import spawn_reward

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import ActorGroup
    from orchestrator.runtime.context import StageContext

NAME_PATTERN = r"^[a-z][a-z0-9_]*$"


class PolicyEntry(Frozen):
    """A policy to compare: its name in the metrics and table, and its checkpoint."""

    name: str = Field(pattern=NAME_PATTERN, max_length=48)
    model: PathOrRef


class EvalPromptsConfig(PromptLengthFields, ReadsFromStage):
    """Held-out prompts (a column of texts or conversations, as in the online stages)."""

    FROM_FIELDS: ClassVar[tuple[str, ...]] = ("prompts",)
    prompts: PathOrRef
    column: str = "prompt"
    max_prompts: int | None = Field(None, ge=1, description="cap on the prompts evaluated")


class EvalSamplingConfig(Frozen):
    """What each policy generates per prompt: one greedy response and K samples."""

    samples_per_prompt: int = Field(4, ge=1, description="K sampled responses per prompt")
    temperature: float = Field(1.0, gt=0, description="1.0 makes the KL an estimate of KL(policy ‖ reference)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(16, ge=1)


class BootstrapConfig(Frozen):
    """The percentile bootstrap over prompts of the win rates' intervals."""

    resamples: int = Field(1000, ge=100)
    confidence: float = Field(0.95, gt=0, lt=1)


class EvaluateStage(StageBase):
    """Compare policies on the same held-out prompts: reward, exact match, KL, length, win rate ± CI."""

    kind: Literal["evaluate"]
    policies: tuple[PolicyEntry, ...] = Field(
        min_length=1, description="the policies, each {name, model} or just {from: STAGE} (named after the stage)")
    baseline: str | None = Field(None, description="the policy the win rates are against (default: the first)")
    reference: str | None = Field(None, description="the policy the KL is to (default: the baseline)")
    data: EvalPromptsConfig
    reward: RewardConfig | None = Field(None, description="the judge of rewards and win rates (default: the checker)")
    checker: str | None = Field(None, description="module:function; exact_match = share of greedy answers scored >= 1")
    sampling: EvalSamplingConfig = EvalSamplingConfig()
    bootstrap: BootstrapConfig = BootstrapConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward_group: RewardGroupConfig = RewardGroupConfig()
    environment: EnvironmentConfig | None = Field(
        None, description="judge each policy's trajectories in this environment (held-out tasks; success_rate)")
    env_group: EnvGroupConfig = EnvGroupConfig()
    benchmarks: BenchmarksConfig | None = Field(None, description="lm-eval tasks run against each policy; results "
                                                "join its row as lm_eval/<task>/<metric>")
    registry: EvaluateRegistryConfig = EvaluateRegistryConfig()
    trust_remote_code: bool = False
    seed: int = Field(0, description="sampling seed (default: the pipeline's seed)")

    ROLES: ClassVar[tuple[str, ...]] = ("rollout", "reward", "environment")
    PHASES: ClassVar[tuple[tuple[str, ...], ...]] = (ROLES,)
    MODEL_FIELD: ClassVar[str | None] = "policies.0.model"
    ROLE_FIELDS: ClassVar[dict[str, str]] = {"rollout": "rollout", "reward": "reward_group", "environment": "env_group"}
    OUTPUTS: ClassVar[dict[str, str]] = {"generations": "generations", "comparison": "comparison"}
    INPUTS: ClassVar[dict[str, tuple[str, str]]] = {
        "reward.model": ("reward_model", "reward_model"),
        "reward.judge.model": ("model", "model"),
        "data.prompts": ("prompts", "prompts_eval"),
    }

    def longest_sequence(self) -> tuple[str, int] | None:
        setting = "data.max_prompt_length + sampling.max_new_tokens"
        return setting, self.data.max_prompt_length + self.sampling.max_new_tokens

    @field_validator("policies", mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        """``{from: sft}`` (optionally with ``output``) stands for ``{name: sft, model: {from: sft}}``."""
        if not isinstance(value, list | tuple):
            return value
        out = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                raise ValueError(f"policies[{i}]: give {{name: NAME, model: {item}}} (a path needs a name)")
            if isinstance(item, dict) and "from" in item and "model" not in item:
                item = {"name": item["from"], "model": item}
            out.append(item)
        return out

    @model_validator(mode="after")
    def _consistent(self) -> EvaluateStage:
        names = [p.name for p in self.policies]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"policies: the name {dupes[0]!r} is given twice")
        for field, value in (("baseline", self.baseline), ("reference", self.reference)):
            if value is not None and value not in names:
                raise ValueError(f"{field}: {value!r} is not one of the policies {names}")
        if self.reward is not None and self.reward.served is not None:
            raise ValueError("reward.served: the evaluate stage judges with its own reward role; give reward.model "
                             "(or a function or a judge)")
        if self.environment is not None and (self.reward is not None or self.checker is not None):
            raise ValueError("environment: judges the trajectories itself; drop reward and checker")
        if self.reward is None and self.checker is None and self.environment is None:
            raise ValueError("reward: give a reward (function or model), a checker or an environment to judge by")
        promote, tasks = self.registry.promote, {t.rsplit("/", 1)[-1].removesuffix(".yaml")
                                                 for t in (self.benchmarks.tasks if self.benchmarks else ())}
        for key in promote.require if promote else ():
            metric = key.lstrip("-")
            if metric.startswith("lm_eval/") and metric.split("/")[1] not in tasks:
                raise ValueError(f"registry.promote.require: {metric} needs the task {metric.split('/')[1]!r} "
                                 f"in benchmarks.tasks ({sorted(tasks) or 'none'})")
        for name in (promote.policies or ()) if promote else ():
            if name not in names:
                raise ValueError(f"registry.promote.policies: {name!r} is not one of the policies {names}")
        need = self.data.max_prompt_length + self.sampling.max_new_tokens
        if self.environment is not None:
            need = self.environment.max_total_tokens
        if need > self.rollout.max_model_len:
            raise ValueError(f"rollout.max_model_len: {self.rollout.max_model_len} < data.max_prompt_length + "
                             f"sampling.max_new_tokens = {need}")
        return self

    @property
    def baseline_name(self) -> str:
        return self.baseline or self.policies[0].name

    @property
    def reference_name(self) -> str:
        return self.reference or self.baseline_name

    def inputs(self) -> dict[str, tuple[str, str]]:
        given = {k: v for k, v in self.INPUTS.items() if not k.startswith("reward.") or self.reward is not None}
        return {**{f"policies.{i}.model": ("model", "model") for i in range(len(self.policies))}, **given}

    def input_context(self, field_path: str) -> Literal["train", "eval"]:
        return "eval"  # it trains on nothing: every prompt it reads is held out

    def after_run(self, outputs: dict[str, str], registry: Registry | None) -> list[str]:
        """Tag the model versions of the policies it compared that stages of this pipeline run registered
        (a ``{from: STAGE}`` policy) with its numbers for them (``<this stage>/<metric>``), then move
        ``registry.promote``'s alias to those that meet its requirements. Returns the console lines."""
        promoting = self.registry.promote
        if "comparison" not in outputs:
            return []
        if registry is None:
            return ([f"{self.name}: registry.promote: this pipeline registers no models; no alias moved"]
                    if promoting else [])
        rows = {row["policy"]: row for row in json.loads(Path(outputs["comparison"]).read_text())["policies"]}
        registered = {e.name: e.model.from_ for e in self.policies if isinstance(e.model, StageRef)}
        for name, stage in registered.items():
            registry.tag_versions(stage, {f"{self.name}/{key}": f"{value:.6g}" for key, value in rows[name].items()
                                          if isinstance(value, float)})
        return promote(promoting, registered, rows, registry, self.name) if promoting else []

    def function_rewards(self) -> list[str]:
        return [f for f in (self.reward and self.reward.function, self.checker) if f]

    def role_configs(self) -> dict[str, Any]:
        roles = {"rollout": self.rollout, "reward": self.reward_group} if self.reward else {"rollout": self.rollout}
        return roles | ({"environment": self.env_group} if self.environment and self.env_group.num_workers else {})

    def reads_tasks(self) -> bool:
        return self.environment is not None

    def check_model(self, path: str, tokenizer: Any = None) -> None:
        if self.environment is not None:
            self.environment.check_template(f"{self.name}: the policy {path}", path, tokenizer,
                                            trust_remote_code=self.trust_remote_code)

    def phases(self) -> tuple[tuple[str, ...], ...]:
        return (tuple(self.role_configs()),)

    def numbers(self) -> dict[str, float | str]:
        return {"policies": len(self.policies), "samples_per_prompt": self.sampling.samples_per_prompt,
                "baseline": self.baseline_name, "reference": self.reference_name,
                "judge": "reward" if self.reward else "environment" if self.environment else "checker"}


def check_same_architecture(names: list[str], paths: list[str]) -> None:
    """Every policy is loaded into the first one's engine: same tensor names and shapes."""
    first = checkpoint_shapes(paths[0])
    if not first:
        raise DataError(f"policies[0] ({names[0]}): {paths[0]} holds no safetensors files; evaluate loads each "
                        "policy from a local checkpoint directory")
    for i, (name, path) in enumerate(zip(names, paths, strict=True)):
        shapes = checkpoint_shapes(path)
        if shapes != first:
            differ = sorted(set(shapes) ^ set(first)) or sorted(k for k in shapes if shapes[k] != first[k])
            raise DataError(f"policies[{i}] ({name}): {path} is not the architecture of policies[0] ({names[0]}); "
                            f"first difference: {differ[:1] or 'no safetensors files'}")


def run(cfg: EvaluateStage, ctx: StageContext) -> dict[str, str]:
    names = [p.name for p in cfg.policies]
    paths = [str(ctx.input(f"policies.{i}.model")) for i in range(len(names))]
    check_same_architecture(names, paths)
    tokenizer = load_tokenizer(paths[0], trust_remote_code=cfg.trust_remote_code)
    prompts = _held_out(cfg, ctx, paths[0], tokenizer)
    rollout, reward, environments = _spawn(cfg, ctx, paths[0])
    k, per_chunk = cfg.sampling.samples_per_prompt, cfg.rollout.prompts_per_chunk
    serving = {"path": paths[0], "version": 0}
    rollout.on_replace.append(lambda group, rank: group.on_ranks(  # a replaced rank serves what the others do
        [rank], RolloutWorker.load_checkpoint, serving["path"], serving["version"]))

    def serve(index: int) -> None:
        if serving["path"] != paths[index]:
            serving.update(path=paths[index], version=serving["version"] + 1)
            rollout.broadcast(RolloutWorker.load_checkpoint, paths[index], serving["version"])

    greedy_spec = SamplingSpec(max_new_tokens=cfg.sampling.max_new_tokens, temperature=0.0)
    s = cfg.sampling
    sampled_spec = SamplingSpec(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, n=k,
                                seed=cfg.seed)
    results: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        serve(i)
        if cfg.environment is not None:  # K trajectories per task and a greedy one, judged by the environment
            with ctx.log.timed("generate", {}):
                results[name] = MultiTurn(cfg.environment, rollout, environments, tokenizer, prompts.fields,
                                          samples_per_prompt=k, sampling=sampled_spec, prompts_per_chunk=per_chunk,
                                          seed=cfg.seed).judge(greedy_spec, sampled_spec)
        else:
            with ctx.log.timed("generate", {}):
                greedy = generate(rollout, prompts.ids, greedy_spec, per_chunk)
                sampled = generate(rollout, prompts.ids, sampled_spec, per_chunk)
            with ctx.log.timed("score", {}):
                results[name] = _judge(cfg, reward, prompts.fields, greedy, sampled, k)
        ctx.log.progress(i + 1, len(names) + 1, {})
    with ctx.log.timed("ref_logprobs", {}):
        serve(names.index(cfg.reference_name))
        for name in names:
            _kl_to_reference(rollout, results[name], per_chunk * k)
    ctx.log.progress(len(names) + 1, len(names) + 1, {})
    table = comparison(cfg, names, results)
    if cfg.benchmarks is not None:  # the harness on each checkpoint, in the driver (after the engines' work)
        with ctx.log.timed("benchmarks", {}):
            for row, path in zip(table, paths, strict=True):
                row |= run_benchmarks(cfg.benchmarks, path, trust_remote_code=cfg.trust_remote_code)
    for row in table:
        ctx.log.metrics({f"eval/{row['policy']}/{key}": value for key, value in row.items()
                         if isinstance(value, float) and math.isfinite(value)}, step=0)
    out = Path(ctx.stage_dir)
    generations = out / "generations.parquet"
    pq.write_table(generations_table(names, prompts.texts, results, k), generations)
    (out / "comparison.json").write_text(json.dumps({"baseline": cfg.baseline_name, "reference": cfg.reference_name,
                                                     "judge": cfg.numbers()["judge"],
                                                     "confidence": cfg.bootstrap.confidence, "policies": table},
                                                    indent=1))
    ctx.log.table({key: [row.get(key) for row in table] for key in table[0]}, "comparison.json")
    return {"generations": str(generations), "comparison": str(out / "comparison.json")}


def _held_out(cfg: EvaluateStage, ctx: StageContext, first: str, tokenizer: Any) -> Prompts:
    """The held-out prompts under the length policy (counted as params), or an environment's tasks
    (their first messages come from it; its template checked first)."""
    d, path = cfg.data, str(ctx.input("data.prompts"))
    if cfg.environment is not None:
        cfg.check_model(first, tokenizer)
        return load_tasks(path, d.column, d.max_prompts)
    lengths = d.lengths(path)
    prompts = load_prompts(path, tokenizer, d.column, lengths, d.max_prompts)
    ctx.log.params(lengths.report("prompts"))
    return prompts


def _spawn(cfg: EvaluateStage, ctx: StageContext, first: str
           ) -> tuple[ActorGroup, ActorGroup | None, ActorGroup | None]:
    rollout = spawn_rollout(ctx, cfg.rollout, first, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code)
    reward = environments = None
    if cfg.reward is not None:
        source = cfg.reward.source(ctx.input, gpu=bool(cfg.reward_group.gpus_per_worker))
        spec = (("reward", cfg.reward.function, source, cfg.reward.normalize),)
        reward = spawn_reward(ctx, cfg.reward_group, spec, trust_remote_code=cfg.trust_remote_code)
    if cfg.environment is not None and cfg.env_group.num_workers:
        environments = ctx.roles.spawn("environment", EnvironmentWorker, cfg.environment.factory(),
                                       call_timeout_s=cfg.environment.call_timeout_s)
    pending = [g.setup_async(m) for g, m in ((rollout, RolloutWorker.setup), (reward, RewardSet.setup),
                                             (environments, EnvironmentWorker.setup)) if g]
    for p in pending:
        p.get()
    return rollout, reward, environments


def _kl_to_reference(rollout: ActorGroup, result: dict[str, Any], per_chunk: int) -> None:
    """The served (reference) policy's log-probs of a policy's sampled tokens, and the sampled KL to
    it: over the policy's own tokens (a trajectory's environment tokens have log-prob 0 on its side)."""
    sampled = result["sampled"]
    ref = rollout.balanced(RolloutWorker.token_logprobs, _chunks(sampled, per_chunk))
    result["ref_logps"] = [[lp * m for lp, m in zip(row, x.sampled_mask(), strict=True)]
                           for row, x in zip((row for chunk in ref for row in chunk), sampled, strict=True)]
    result["kl"] = sampled_kl([x.logprobs for x in sampled], result["ref_logps"])


def _chunks(samples: list[RolloutSample], size: int) -> list[list[tuple[list[int], list[int]]]]:
    pairs = [(x.prompt_ids, x.response_ids) for x in samples]
    return [pairs[i : i + size] for i in range(0, len(pairs), size)]


def _judge(cfg: EvaluateStage, reward: ActorGroup | None, fields: list[Any], greedy: list[RolloutSample],
           sampled: list[RolloutSample], k: int) -> dict[str, Any]:
    """Rewards (the judge: the reward role, else the checker) and checks of one policy's responses."""
    texts = [x.text for x in greedy] + [x.text for x in sampled]
    prompts = list(fields) + [f for f in fields for _ in range(k)]
    checks = FunctionReward(cfg.checker).score(prompts, texts) if cfg.checker else None
    unparsable = None
    if reward is not None:
        rows = score(reward, prompts, texts, cfg.reward_group.items_per_chunk, method=RewardSet.score_chunk)
        rewards = [row[0] for row in rows]
        if cfg.reward is not None and cfg.reward.judge is not None:  # the judge's unparsable verdicts, counted
            counts = reward.broadcast(RewardSet.take_counts)
            unparsable = float(sum(c.get("unparsable", 0) for c in counts))
    else:
        rewards = list(checks)
    n = len(greedy)
    return {"greedy": greedy, "sampled": sampled, "greedy_rewards": rewards[:n], "rewards": rewards[n:],
            "greedy_checks": checks[:n] if checks else None, "checks": checks[n:] if checks else None,
            "judge_unparsable": unparsable}


def comparison(cfg: EvaluateStage, names: list[str], results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per policy: its numbers, and its win rates against the baseline with their intervals."""
    k, b = cfg.sampling.samples_per_prompt, cfg.bootstrap
    base = results[cfg.baseline_name]
    table = []
    for i, name in enumerate(names):
        r = results[name]
        row: dict[str, Any] = {"policy": name}
        row["reward_mean"] = _mean(r["rewards"])
        row["greedy_reward_mean"] = _mean(r["greedy_rewards"])
        if r["greedy_checks"] is not None:
            check = "success_rate" if cfg.environment is not None else "exact_match"
            row[check] = exact_match(r["greedy_checks"])
            row[f"sampled_{check}"] = exact_match(r["checks"])
        if r.get("judge_unparsable") is not None:
            row["judge_unparsable"] = r["judge_unparsable"]
        row["kl"] = float(r["kl"].mean())
        row["response_length_mean"] = _mean([float(sum(x.sampled_mask())) for x in r["sampled"]])
        for mode, key, width in (("", "rewards", k), ("greedy_", "greedy_rewards", 1)):
            mine = torch.tensor(r[key], dtype=torch.float64).view(-1, width)
            theirs = torch.tensor(base[key], dtype=torch.float64).view(-1, width)
            per_prompt = win_rates(mine, theirs)
            low, high = bootstrap_interval(per_prompt, resamples=b.resamples, confidence=b.confidence, seed=i)
            row |= {f"{mode}win_rate": float(per_prompt.mean()), f"{mode}win_rate_low": low,
                    f"{mode}win_rate_high": high}
        table.append(row)
    return table


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


STAGE = StageKind(EvaluateStage, run)
