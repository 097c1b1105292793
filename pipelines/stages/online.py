"""The online family (``onpolicy_dpo``, ``ppo``): ``OnlineStage``, the config every online stage has and
what the one iteration loop (``online_loop.run_online``) asks of it, and ``OnlineAlgorithm``, what a
stage supplies to that loop.

What the loop needs of a stage, with neutral defaults a kind overrides: its designer rewards
(``auxiliary_objective``: UPO scores them beside the stage reward), DAPO's dynamic sampling
(``dynamic_sampling``), and where its reference log-probs come from (``reference_source``, from
``PolicyStage``). How a batch is sampled is the loop's ``Sampler`` (one completion per prompt; the
place a multi-turn environment plugs in).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import torch
from pydantic import Field, field_validator, model_validator

from actors.rollout import RolloutSample
from pipelines.environments.base import EnvironmentFactory
from pipelines.errors import ConfigError
from pipelines.stages.auxiliary import AuxiliaryObjective
from pipelines.stages.base import Frozen, Metric, PathOrRef, ReadsFromStage, with_default
from pipelines.stages.config import (
    PolicyStage,
    PromptLengthFields,
    ReferenceConfig,
    RewardConfig,
    RewardGroupConfig,
    TrainerConfig,
)

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import ActorGroup
    from orchestrator.runtime.context import StageContext
    from pipelines.stages.timeline import Submitted


class PromptDataConfig(PromptLengthFields, ReadsFromStage):
    """Prompts for on-policy stages: a column (default ``prompt``) of texts or conversations, which
    the policy's chat template renders with its generation prompt. See docs/data.md."""

    train: PathOrRef
    eval: PathOrRef | None = Field(None, description="held-out prompts, decoded greedily for eval/ metrics")
    column: str = "prompt"
    eval_prompts: int | None = Field(None, ge=1, description="cap on held-out prompts evaluated")


class OnPolicySamplingConfig(Frozen):
    """How the rollout workers sample: K responses per prompt with the current policy."""

    samples_per_prompt: int = Field(4, ge=2, description="K")
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)


class OnPolicyEvalConfig(Frozen):
    """Held-out greedy generations and the per-iteration sample table."""

    max_new_tokens: int | None = Field(None, ge=1, description="default: sampling.max_new_tokens")
    checker: str | None = Field(None, description="module:function; eval/exact_match = share scored >= 1")
    table_rows: int = Field(16, ge=0, description="sample generations per iteration logged with mlflow.log_table")


class WeightSyncConfig(Frozen):
    """How trainer weights reach the rollout engines after each update (orchestrator.runtime.weight_sync)."""

    transport: Literal["object_store", "collective"] = Field(
        "object_store", description="object_store: Ray objects, actor to actor; collective: gloo (CPU) / NCCL (GPU) "
        "broadcast")
    bucket_mib: float = Field(64.0, gt=0, description="parameters are sent in buckets of about this size")
    tolerance: float = Field(1e-3, gt=0, description="max |rollout − trainer| log-prob on the probe batch after a sync")
    verify_every: int = Field(
        10, ge=0, description="check the engines' log-probs against the trainer's on a few samples after the first "
        "sync of a stage and then every N syncs (0: only the first); a failed check stops the stage. Between checks "
        "rollout/logprob_gap measures the same gap on every iteration's samples")


class RolloutConfig(Frozen):
    """The vLLM rollout workers: one engine per worker, created once per stage and reused."""

    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine; needs gpus_per_worker equal to it")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = Field(256, ge=8, description="prompt + response tokens; at most the model's positions")
    kv_cache_gib: float = Field(1.0, gt=0, description="CPU engines: KV-cache size")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="GPU engines: share of device memory")
    prompts_per_chunk: int = Field(16, ge=1, description="prompts per dispatch to a worker (balancing unit) when "
                                   "a reward role scores the samples as they arrive; samples scored in the workers "
                                   "(function_rewards: rollout) go in one call per worker")
    function_rewards: Literal["rollout", "reward_group"] = Field(
        "rollout", description="where a function reward runs: rollout = in the rollout workers, on each sample as it "
        "is generated (no reward role, one call per worker and iteration); reward_group = in its own role. Model "
        "rewards and UPO's designer rewards always run in the reward role")
    max_staleness: int = Field(
        0, ge=0, description="asynchronous rollouts: generate the batches of the next k iterations while the trainer "
        "learns, so a batch is at most k weight versions behind the trainer; 0 = the synchronous loop")
    overlap_phases: bool = Field(
        True, description="score each chunk of samples as it is generated, and run an iteration's independent "
        "forwards over its samples (reference, policy and critic log-probs/values) concurrently with each other and "
        "with the rest of the scoring; false: one after another")
    old_logprobs: Literal["trainer", "rollout"] = Field(
        "trainer", description="the samples' log-probs under the policy that sampled them (PPO's pi_old, on-policy "
        "DPO's policy reference): 'trainer' = a forward of the trainer over the samples (and the train-inference gap "
        "measured every iteration, rollout/logprob_gap); 'rollout' = the rollout engine's own log-probs of the "
        "sampled tokens, no forward (within weight_sync.tolerance of the trainer's, checked at each verified sync). "
        "'rollout' needs max_staleness: 0")
    weight_sync: WeightSyncConfig = WeightSyncConfig()

    @model_validator(mode="after")
    def _tensor_parallel_has_gpus(self) -> RolloutConfig:
        tp = self.tensor_parallel_size
        if tp > 1 and self.gpus_per_worker != tp:
            raise ValueError(f"gpus_per_worker: tensor_parallel_size {tp} needs {tp} whole GPUs per rollout worker, "
                             f"got {self.gpus_per_worker:g}")
        if self.old_logprobs == "rollout" and self.max_staleness:
            raise ValueError("old_logprobs: 'rollout' needs max_staleness: 0 (stale samples are weighted by the "
                             "trainer's log-probs over the engine's: set old_logprobs: trainer)")
        return self


class EnvironmentConfig(Frozen):
    """A multi-turn environment instead of a single-turn reward (docs/environments.md): each task (a row
    of ``data.train``) is a trajectory of policy turns and environment answers, rewarded by the
    environment; K trajectories per task."""

    cls: str = Field(description="module:Class of the environment (pipelines.environments.base.Environment)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the class")
    max_turns: int = Field(4, ge=1, description="policy turns per trajectory (each at most sampling.max_new_tokens)")
    max_total_tokens: int = Field(
        512, ge=8, description="a trajectory's tokens, its first prompt included; one that would pass it ends")
    call_timeout_s: float = Field(30.0, gt=0, description="deadline of every reset and step of an environment")

    @field_validator("cls")
    @classmethod
    def _importable(cls, value: str) -> str:
        try:  # a typo or a missing module fails here, before any actor starts
            EnvironmentFactory(value).load()
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("environment.cls: ")) from None
        return value

    def factory(self) -> EnvironmentFactory:
        return EnvironmentFactory(self.cls, tuple(sorted(self.kwargs.items())))

    def check_template(self, where: str, path: str, tokenizer: Any = None, *, trust_remote_code: bool = False) -> None:
        """Before any actor starts: the environment's messages must extend the policy's chat template
        append-only (``environments.tokens.check_append_only``), with its tools' schemas."""
        from pipelines.data.tokens import load_tokenizer
        from pipelines.environments.tokens import check_append_only

        tools = self.factory().tools()
        tokenizer = tokenizer or load_tokenizer(path, trust_remote_code=trust_remote_code)
        check_append_only(tokenizer, tools, ("tool", "user") if tools else ("user",), where=where)


class EnvGroupConfig(Frozen):
    """Where the environments run: actors of their own (``num_workers`` >= 1) or the driver (0)."""

    num_workers: int = Field(1, ge=0, description="environment actors; 0: the environments run in the driver")
    cpus_per_worker: float = Field(0.25, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)


class OnlineSchedule(Frozen):
    """Iterations of rollout → score → … → update → sync; a kind adds how it updates."""

    iterations: int = Field(10, ge=1)
    prompts_per_iteration: int = Field(64, ge=1)
    eval_every: int = Field(0, ge=0, description="iterations between held-out evaluations; 0 = start and end")
    seed: int = 0


class OnlineStage(PolicyStage):
    """An online stage: the policy samples K responses per prompt on vLLM rollout workers, a reward
    scores them, the stage's algorithm learns from them, and the new weights go back to the workers."""

    reward: RewardConfig | None = Field(None, description="the reward of single-turn samples (or environment)")
    environment: EnvironmentConfig | None = Field(None, description="multi-turn rollouts in an environment, which "
                                                  "rewards them (instead of reward)")
    env_group: EnvGroupConfig = EnvGroupConfig()
    data: PromptDataConfig
    sampling: OnPolicySamplingConfig = OnPolicySamplingConfig()
    schedule: OnlineSchedule = OnlineSchedule()
    eval: OnPolicyEvalConfig = OnPolicyEvalConfig()
    trainer: TrainerConfig = TrainerConfig()
    reference_group: ReferenceConfig = ReferenceConfig()
    reward_group: RewardGroupConfig = RewardGroupConfig()
    rollout: RolloutConfig = RolloutConfig()

    def longest_sequence(self) -> tuple[str, int] | None:
        if self.environment is not None:
            return "environment.max_total_tokens", self.environment.max_total_tokens
        new = max(self.sampling.max_new_tokens, self.eval.max_new_tokens or 0)
        return "data.max_prompt_length + max_new_tokens", self.data.max_prompt_length + new

    # Each role's CPUs where the YAML does not set them: every role of the stage at once fits 2 CPUs.
    ROLE_FIELDS: ClassVar[dict[str, str]] = PolicyStage.ROLE_FIELDS | {"reward": "reward_group", "rollout": "rollout",
                                                                       "environment": "env_group"}
    ROLE_CPUS: ClassVar[dict[str, float]] = {"policy_trainer": 0.5, "reference": 0.25, "reward": 0.25,
                                             "rollout": 1.0, "environment": 0.25}
    CHECKPOINT_EVERY: ClassVar[int] = 10
    # Whether the stage learns without a reward or environment (distillation: a teacher's log-probs).
    REWARD_OPTIONAL: ClassVar[bool] = False
    OUTPUTS: ClassVar[dict[str, str]] = {"model": "model"}
    INPUTS: ClassVar[dict[str, tuple[str, str]]] = {
        "policy": ("model", "model"),
        "reference": ("model", "model"),
        "reward.model": ("reward_model", "reward_model"),
        "reward.judge.model": ("model", "model"),
        "data.train": ("prompts", "prompts_train"),
        "data.eval": ("prompts", "prompts_eval"),
    }
    HEADLINE: ClassVar[tuple[Metric, ...]] = (
        Metric("objective/scores", "score"), Metric("objective/kl", "kl"), Metric("loss", "loss"),
        Metric("eval/exact_match", "eval_em", ranks=True), Metric("eval/reward_mean", "eval_reward", ranks=True),
        Metric("eval/response_length_mean", "eval_len"),
        Metric("eval/success_rate", "eval_success", ranks=True), Metric("eval/sampled_success_rate", "eval_sampled"),
        Metric("env/turns_mean", "turns"),
    )

    @model_validator(mode="after")
    def _role_cpus(self) -> OnlineStage:
        """``ROLE_CPUS`` for each role section that sets no ``cpus_per_worker``: still a default
        (``with_default``), so the plan may fit it to the machine. Rollout workers that score the
        samples themselves take the reward role's share too."""
        scoring = self.ROLE_CPUS["reward"] if self.reward_in_rollout() else 0.0
        for role, config in self.own_roles().items():
            if role in self.ROLE_CPUS and "cpus_per_worker" not in config.model_fields_set:
                cpus = self.ROLE_CPUS[role] + (scoring if role == "rollout" else 0.0)
                filled = with_default(config, cpus_per_worker=cpus)
                object.__setattr__(self, self.ROLE_FIELDS[role], filled)  # frozen: set once, here
        return self

    def auxiliary_objective(self) -> AuxiliaryObjective | None:
        """Designer rewards the reward role scores beside the stage reward (UPO); None: none."""
        return None

    def dynamic_sampling(self) -> int | None:
        """DAPO's dynamic sampling: at most this many generation rounds per iteration; None: off."""
        return None

    def old_logprobs_in_update(self) -> bool:
        """Whether the trainer takes the samples' π_old inside its update call (no forward of its own)."""
        return False

    def function_rewards(self) -> list[str]:
        return [f for f in (self.reward and self.reward.function, self.eval.checker) if f]

    def reward_in_rollout(self) -> bool:
        """Whether the rollout workers score the samples: a function reward, no designer rewards beside
        it, ``rollout.function_rewards: rollout``."""
        return (self.reward is not None and self.reward.function is not None and self.auxiliary_objective() is None
                and self.rollout.function_rewards == "rollout")

    def needs_reward_role(self) -> bool:
        """Whether a reward role starts: a reward that neither the rollout workers score (a function)
        nor Serve's replicas (``reward.served``)."""
        return self.reward is not None and self.reward.served is None and not self.reward_in_rollout()

    def own_roles(self) -> dict[str, Any]:
        roles = {"policy_trainer": self.trainer, "reference": self.reference_group}
        if self.environment is None:
            reward = {"reward": self.reward_group} if self.needs_reward_role() else {}
            return roles | reward | {"rollout": self.rollout}
        return roles | {"rollout": self.rollout} | ({"environment": self.env_group} if self.env_group.num_workers
                                                    else {})

    @model_validator(mode="after")
    def _one_reward(self) -> OnlineStage:
        """A single-turn reward or an environment; an environment's trajectories fit the engine."""
        if self.reward is not None and self.environment is not None:
            raise ValueError("reward: give one of reward (single-turn samples) or environment (multi-turn "
                             "trajectories, rewarded by the environment), not both")
        if self.reward is None and self.environment is None and not self.REWARD_OPTIONAL:
            raise ValueError("reward: give exactly one of reward (single-turn samples) or environment (multi-turn "
                             "trajectories, rewarded by the environment)")
        env = self.environment
        if env is not None and env.max_total_tokens > self.rollout.max_model_len:
            raise ValueError(f"environment.max_total_tokens: {env.max_total_tokens} exceeds rollout.max_model_len "
                             f"({self.rollout.max_model_len})")
        if env is not None and self.eval.checker:
            raise ValueError("eval.checker: with an environment, held-out tasks are judged by it (eval/success_rate)")
        if env is not None and self.dynamic_sampling() is not None:
            raise ValueError("sampling.dynamic: not available with an environment yet (docs/environments.md)")
        return self

    def reads_tasks(self) -> bool:
        return self.environment is not None

    def check_model(self, path: str, tokenizer: Any = None) -> None:
        if self.environment is not None:
            self.environment.check_template(f"{self.name}: the policy {path}", path, tokenizer,
                                            trust_remote_code=self.trainer.trust_remote_code)

    def online_numbers(self) -> dict[str, float | str]:
        """The plan numbers every online stage shares (a kind adds its trainer's)."""
        s = self.schedule
        return {"iterations": s.iterations, "prompts_per_iteration": s.prompts_per_iteration,
                "samples_per_iteration": s.prompts_per_iteration * self.sampling.samples_per_prompt,
                "rollout_workers": self.rollout.num_workers, "reference_logprobs": self.reference_note()}

    @model_validator(mode="after")
    def _fits_the_engine(self) -> OnlineStage:
        """The prompts plus the longest generation must fit the rollout engine's context (with an
        environment: its ``max_total_tokens``, checked with the environment)."""
        if self.environment is not None:
            return self
        need = self.data.max_prompt_length + max(self.sampling.max_new_tokens, self.eval.max_new_tokens or 0)
        if need > self.rollout.max_model_len:
            raise ValueError(f"rollout.max_model_len: {self.rollout.max_model_len} < data.max_prompt_length + "
                             f"max_new_tokens = {need}")
        return self


@dataclass
class Scored:
    """One iteration's samples (K per prompt, grouped by prompt) with rewards and log-probs."""

    prompt_texts: list[str]
    samples: list[RolloutSample]
    rewards: list[float]
    ref_logps: list[list[float]] | None  # per token, reference role; None for a reference-free loss
    aux: torch.Tensor | None = None  # (N, K) auxiliary (designer) rewards of the samples (UPO)
    forwards: dict[str, Any] = field(default_factory=dict)  # the algorithm's own forwards (PPO: "values")

    def per_prompt(self, k: int) -> list[range]:
        return [range(i, i + k) for i in range(0, len(self.samples), k)]


Sequences = list[tuple[list[int], list[int]]]  # (prompt ids, response ids) of each sample


class OnlineAlgorithm(Protocol):
    """What an online stage supplies to ``run_online``; everything else is the loop's. The phases
    ``learn`` times (``ctx.log.timed``) land in the timeline between the sampling phases and ``sync_weights``."""

    def trainer_steps(self) -> tuple[int, int, int]:
        """The policy trainer's (total optimizer steps, examples per step, examples per micro-batch)."""
        ...

    def spawn(self, ctx: StageContext, trainer: ActorGroup, policy_path: str, pad_id: int) -> list[ActorGroup]:
        """Take the policy trainer and start the stage's other trainer groups (e.g. the critic); those
        are checkpointed with the policy."""
        ...

    def restore(self, done: int, state: dict[str, Any]) -> None:
        """Continue after ``done`` iterations from the checkpoint's ``state`` ({} and 0 on a fresh start)."""
        ...

    def forwards(self) -> dict[str, Callable[[Sequences], Submitted]]:
        """The stage's own forwards over an iteration's samples (phase → submit(sequences)), run beside
        the reference and policy log-probs; their results reach ``learn`` in ``Scored.forwards``."""
        ...

    def learn(self, ctx: StageContext, iteration: int, scored: Scored, policy_lp: list[list[float]],
              m: dict[str, float]) -> bool:
        """Turn the iteration's scored samples into optimizer steps, adding metrics to ``m``; False when
        there was nothing to train on (the weights did not change: no sync)."""
        ...

    def state(self) -> dict[str, Any]:
        """The loop state a checkpoint keeps (JSON), beside the weight version."""
        ...

    def outputs(self, ctx: StageContext) -> dict[str, str]:
        """Outputs beside the policy ``model`` (written after the last iteration)."""
        ...
