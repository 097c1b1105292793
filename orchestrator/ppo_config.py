"""Typed config of ``kind: ppo``: online PPO with a critic, or a critic-free estimator (GRPO, RLOO, REINFORCE++)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from orchestrator.stage_config import (
    Frozen,
    OnPolicyEvalConfig,
    OnPolicySamplingConfig,
    OptimConfig,
    PathOrRef,
    PromptDataConfig,
    ReferenceConfig,
    RewardConfig,
    RewardGroupConfig,
    RolloutConfig,
    StageBase,
    TrainerConfig,
    check_model_len,
)

ESTIMATORS = ("ppo", "grpo", "rloo", "reinforce_pp")


class PPOSamplingConfig(OnPolicySamplingConfig):
    """Samples per prompt may be 1 for ``ppo`` and ``reinforce_pp``; ``grpo``/``rloo`` need K ≥ 2."""

    samples_per_prompt: int = Field(4, ge=1, description="K")


class KLConfig(Frozen):
    """The KL(π ‖ π_ref) penalty: its estimator, where it enters, and its coefficient β (fixed or adaptive)."""

    coef: float = Field(0.05, ge=0, description="β (the initial value when adaptive)")
    estimator: Literal["auto", "k1", "k3"] = Field(
        "auto", description="k1 = log π − log π_ref; k3 = (ρ − 1) − log ρ, ρ = π_ref/π; auto: k3 in the loss, k1 in "
        "the reward (in the loss, k1's gradient is zero in expectation: it would not regularise at all)",
    )
    placement: Literal["auto", "reward", "loss"] = Field(
        "auto", description="reward: −β·KL on every token's reward (PPO, REINFORCE++, RLOO); "
        "loss: β·KL added to the policy loss (GRPO as in DeepSeekMath); auto: loss for grpo, reward otherwise",
    )
    target: float | None = Field(None, gt=0, description="adaptive β: target KL per sequence (Ziegler et al. 2019)")
    horizon: int = Field(10000, ge=1, description="adaptive β: samples over which β moves by up to 20%")

    def in_loss(self, estimator: str) -> bool:
        return self.placement == "loss" or (self.placement == "auto" and estimator == "grpo")

    def estimator_for(self, estimator: str) -> str:
        """The KL estimator used with the policy-gradient ``estimator`` (``auto`` resolved)."""
        if self.estimator != "auto":
            return self.estimator
        return "k3" if self.in_loss(estimator) else "k1"


class PPOAlgorithmConfig(Frozen):
    """The estimator and the clipped objectives (``pipelines.algorithms.ppo``)."""

    estimator: Literal["ppo", "grpo", "rloo", "reinforce_pp"] = Field(
        "ppo", description="ppo: critic + GAE; grpo: group mean/std; rloo: leave-one-out; reinforce_pp: global whitening"
    )
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ (ppo)")
    whiten_advantages: bool = Field(True, description="ppo: whiten GAE advantages over the batch's tokens")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="ε of the clipped surrogate")
    dual_clip: float | None = Field(None, gt=1, description="c of the dual clip for negative advantages (Ye et al. 2020)")
    value_clip_eps: float = Field(0.2, gt=0, description="clip of V − V_old in the value loss")
    missing_eos_penalty: float = Field(0.0, ge=0, description="subtracted from the score of responses without EOS")
    kl: KLConfig = KLConfig()


class PPOScheduleConfig(Frozen):
    """Iterations of rollout → score → ref/values → advantages → update → sync."""

    iterations: int = Field(10, ge=1)
    prompts_per_iteration: int = Field(64, ge=1)
    ppo_epochs: int = Field(1, ge=1, description="passes over each iteration's samples")
    minibatches_per_epoch: int = Field(1, ge=1, description="optimizer steps per pass (policy and critic each)")
    samples_per_microbatch: int = Field(16, ge=1, description="samples in one forward/backward on one worker")
    eval_every: int = Field(0, ge=0, description="iterations between held-out evaluations; 0 = start and end")
    seed: int = 0


class CriticConfig(Frozen):
    """The value model: a causal-LM trunk with a one-output head on every position."""

    init: Literal["policy", "reward_model"] = Field(
        "policy", description="policy: the starting policy's trunk with a fresh head; "
        "reward_model: a reward-model checkpoint (critic.model, else reward.model), head included",
    )
    model: PathOrRef | None = Field(
        None, description="reward-model checkpoint for init: reward_model when the reward is not that model "
        "(e.g. a function reward, with the critic still starting from a trained reward model)",
    )
    optim: OptimConfig = OptimConfig(lr=1e-5)


class PPOStage(StageBase):
    """Online RL from a reward: PPO with a critic, or a critic-free group/global baseline."""

    kind: Literal["ppo"]
    policy: PathOrRef
    reference: PathOrRef | None = Field(None, description="default: the starting policy")
    reward: RewardConfig
    data: PromptDataConfig
    algorithm: PPOAlgorithmConfig = PPOAlgorithmConfig()
    sampling: PPOSamplingConfig = PPOSamplingConfig()
    optim: OptimConfig = OptimConfig()
    critic: CriticConfig = CriticConfig()
    schedule: PPOScheduleConfig = PPOScheduleConfig()
    eval: OnPolicyEvalConfig = OnPolicyEvalConfig()
    trainer: TrainerConfig = TrainerConfig()
    critic_group: TrainerConfig = TrainerConfig()
    reference_group: ReferenceConfig = ReferenceConfig()
    reward_group: RewardGroupConfig = RewardGroupConfig()
    rollout: RolloutConfig = RolloutConfig()

    CHECKPOINT_EVERY: ClassVar[int] = 10
    ROLES: ClassVar[tuple[str, ...]] = ("policy_trainer", "critic", "reference", "reward", "rollout")
    PHASES: ClassVar[tuple[tuple[str, ...], ...]] = (("policy_trainer", "critic", "reference", "reward", "rollout"),)
    OUTPUTS: ClassVar[dict[str, str]] = {"model": "model"}
    INPUTS: ClassVar[dict[str, tuple[str, str]]] = {
        "policy": ("model", "model"),
        "reference": ("model", "model"),
        "reward.model": ("reward_model", "reward_model"),
        "critic.model": ("reward_model", "reward_model"),
        "data.train": ("prompts", "prompts_train"),
        "data.eval": ("prompts", "prompts_eval"),
    }

    @property
    def uses_critic(self) -> bool:
        return self.algorithm.estimator == "ppo"

    @property
    def samples_per_minibatch(self) -> int:
        s = self.schedule
        return s.prompts_per_iteration * self.sampling.samples_per_prompt // s.minibatches_per_epoch

    def function_rewards(self) -> list[str]:
        return [f for f in (self.reward.function, self.eval.checker) if f]

    def role_configs(self) -> dict[str, Any]:
        roles: dict[str, Any] = {"policy_trainer": self.trainer}
        if self.uses_critic:
            roles["critic"] = self.critic_group
        return roles | {"reference": self.reference_group, "reward": self.reward_group, "rollout": self.rollout}

    @model_validator(mode="after")
    def _consistent(self) -> PPOStage:
        s, est, k = self.schedule, self.algorithm.estimator, self.sampling.samples_per_prompt
        if est in ("grpo", "rloo") and k < 2:
            raise ValueError(f"sampling.samples_per_prompt: {est} compares samples of one prompt, it needs >= 2, got {k}")
        samples = s.prompts_per_iteration * k
        if samples % s.minibatches_per_epoch:
            raise ValueError(f"schedule.minibatches_per_epoch: {s.minibatches_per_epoch} does not divide the "
                             f"{samples} samples of an iteration (prompts_per_iteration x samples_per_prompt)")
        groups = [("trainer", self.trainer)] + ([("critic_group", self.critic_group)] if self.uses_critic else [])
        for name, group in groups:
            per_worker, rest = divmod(self.samples_per_minibatch, group.num_workers)
            if rest or per_worker % s.samples_per_microbatch:
                raise ValueError(
                    f"schedule.samples_per_microbatch: a minibatch of {self.samples_per_minibatch} samples must split "
                    f"into {name}.num_workers = {group.num_workers} equal shards of whole micro-batches of "
                    f"{s.samples_per_microbatch}")
        if self.uses_critic and self.critic.init == "reward_model" and self.reward.model is None \
                and self.critic.model is None:
            raise ValueError("critic.init: reward_model needs critic.model or reward.model (a reward-model checkpoint)")
        for i, roles in enumerate(self.placement.colocate):
            if "critic" in roles and not self.uses_critic:
                raise ValueError(f"placement.colocate[{i}]: estimator {est} has no critic role")
        check_model_len(self)
        return self
