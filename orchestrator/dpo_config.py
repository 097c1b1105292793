"""Typed config of the DPO-family stages (``offline_dpo``, ``onpolicy_dpo``) and of their optional
auxiliary term: a designer's rewards optimised beside the preferences (UPO, arXiv 2405.17956)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from orchestrator.stage_config import (
    DPOConfig,
    Frozen,
    GenerationEvalConfig,
    OnPolicyEvalConfig,
    OnPolicySamplingConfig,
    OnPolicyScheduleConfig,
    OptimConfig,
    PairDataConfig,
    PairScheduleConfig,
    PairSelectionConfig,
    PathOrRef,
    PromptDataConfig,
    ReferenceConfig,
    RewardConfig,
    RewardGroupConfig,
    RolloutConfig,
    StageBase,
    TrainerConfig,
    check_batches,
    check_model_len,
)


class AuxiliaryRewardConfig(RewardConfig):
    """One designer reward r_k of the auxiliary term: a function or a reward-model checkpoint, with
    its weight c_k in A = Σ_k c_k·r_k − b(x). A negative weight asks for less of the reward."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=32, description="metric name: aux/<name>_mean")
    weight: float = Field(1.0, description="c_k")


class UPOConfig(Frozen):
    """The auxiliary term's coefficients: L = L_pref + λ·L_aux, w = min(exp(A/τ), w_max)."""

    coef: float = Field(1.0, ge=0, description="λ; 0 trains on the preference loss alone (aux metrics still logged)")
    temperature: float = Field(1.0, gt=0, description="τ of the advantage weights exp(A/τ)")
    max_weight: float = Field(20.0, ge=1, description="w_max: weights are clipped here")


AUXILIARY_FIELD = Field((), description="designer rewards optimised beside the preferences (UPO); empty = plain DPO")


def auxiliary_inputs(stage: Any) -> dict[str, tuple[str, str]]:
    """The stage's inputs plus one ``auxiliary.<i>.model`` per auxiliary reward-model checkpoint."""
    return dict(stage.INPUTS) | {f"auxiliary.{i}.model": ("reward_model", "reward_model")
                                 for i, a in enumerate(stage.auxiliary) if a.model is not None}


def check_auxiliary(stage: Any) -> None:
    """Auxiliary reward names are unique, and ``upo`` goes with auxiliary rewards (defaulted when omitted)."""
    names = [a.name for a in stage.auxiliary]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"auxiliary[{i}].name: {name!r} is used twice")
    if stage.upo is not None and not stage.auxiliary:
        raise ValueError("upo: set, but auxiliary lists no rewards; add auxiliary rewards or remove upo")
    if stage.auxiliary and stage.upo is None:
        object.__setattr__(stage, "upo", UPOConfig())  # the defaults, written out in the resolved pipeline


class OfflineDPOStage(StageBase):
    """Offline DPO on a fixed dataset of preference pairs."""

    kind: Literal["offline_dpo"]
    policy: PathOrRef
    reference: PathOrRef | None = Field(None, description="default: the starting policy")
    data: PairDataConfig
    dpo: DPOConfig = DPOConfig()
    generation: GenerationEvalConfig = Field(
        GenerationEvalConfig(enabled=False),
        description="greedy decoding of the held-out pairs' prompts, scored against the chosen response or by a "
        "checker (off by default: a chosen response need not be the one right answer)",
    )
    optim: OptimConfig = OptimConfig()
    schedule: PairScheduleConfig = PairScheduleConfig()
    trainer: TrainerConfig = TrainerConfig()
    reference_group: ReferenceConfig = ReferenceConfig()
    auxiliary: tuple[AuxiliaryRewardConfig, ...] = AUXILIARY_FIELD
    upo: UPOConfig | None = Field(None, description="λ, τ, w_max of the auxiliary term (defaults with auxiliary)")
    reward_group: RewardGroupConfig = Field(RewardGroupConfig(), description="scores the auxiliary rewards")

    CHECKPOINT_EVERY: ClassVar[int] = 100
    ROLES: ClassVar[tuple[str, ...]] = ("reference", "policy_trainer", "reward")
    PHASES: ClassVar[tuple[tuple[str, ...], ...]] = (("reference",), ("policy_trainer",))  # reference log-probs first
    OUTPUTS: ClassVar[dict[str, str]] = {"model": "model"}
    INPUTS: ClassVar[dict[str, tuple[str, str]]] = {
        "policy": ("model", "model"),
        "reference": ("model", "model"),
        "data.train": ("pairs", "pairs_train"),
        "data.eval": ("pairs", "pairs_eval"),
    }

    def inputs(self) -> dict[str, tuple[str, str]]:
        return auxiliary_inputs(self)

    def phases(self) -> tuple[tuple[str, ...], ...]:
        # the auxiliary rewards are scored before training and on held-out generations during it
        return (("reference",), ("reward", "policy_trainer")) if self.auxiliary else self.PHASES

    def function_rewards(self) -> list[str]:
        checker = [self.generation.checker] if self.generation.enabled and self.generation.checker else []
        return checker + [a.function for a in self.auxiliary if a.function]

    def role_configs(self) -> dict[str, Any]:
        roles = {"reference": self.reference_group, "policy_trainer": self.trainer}
        return roles | ({"reward": self.reward_group} if self.auxiliary else {})

    @model_validator(mode="after")
    def _batches_divide(self) -> OfflineDPOStage:
        check_batches(self.schedule.pairs_per_step, self.schedule.pairs_per_microbatch, self.trainer.num_workers, "pairs")
        check_auxiliary(self)
        return self


class OnPolicyDPOStage(StageBase):
    """On-policy DPO with rejection sampling: the policy's own samples, scored and paired each iteration."""

    kind: Literal["onpolicy_dpo"]
    policy: PathOrRef
    reference: PathOrRef | None = Field(None, description="default: the starting policy")
    reference_mode: Literal["fixed", "refresh"] = Field(
        "fixed", description="fixed: the reference model throughout; refresh: the policy at the start of each iteration"
    )
    reward: RewardConfig
    data: PromptDataConfig
    sampling: OnPolicySamplingConfig = OnPolicySamplingConfig()
    selection: PairSelectionConfig = PairSelectionConfig()
    dpo: DPOConfig = DPOConfig()
    optim: OptimConfig = OptimConfig()
    schedule: OnPolicyScheduleConfig = OnPolicyScheduleConfig()
    eval: OnPolicyEvalConfig = OnPolicyEvalConfig()
    trainer: TrainerConfig = TrainerConfig()
    reference_group: ReferenceConfig = ReferenceConfig()
    reward_group: RewardGroupConfig = RewardGroupConfig()
    rollout: RolloutConfig = RolloutConfig()
    auxiliary: tuple[AuxiliaryRewardConfig, ...] = AUXILIARY_FIELD
    upo: UPOConfig | None = Field(None, description="λ, τ, w_max of the auxiliary term (defaults with auxiliary)")

    CHECKPOINT_EVERY: ClassVar[int] = 10
    ROLES: ClassVar[tuple[str, ...]] = ("policy_trainer", "reference", "reward", "rollout")
    PHASES: ClassVar[tuple[tuple[str, ...], ...]] = (("policy_trainer", "reference", "reward", "rollout"),)
    OUTPUTS: ClassVar[dict[str, str]] = {"model": "model", "pairs": "pairs"}
    INPUTS: ClassVar[dict[str, tuple[str, str]]] = {
        "policy": ("model", "model"),
        "reference": ("model", "model"),
        "reward.model": ("reward_model", "reward_model"),
        "data.train": ("prompts", "prompts_train"),
        "data.eval": ("prompts", "prompts_eval"),
    }

    def inputs(self) -> dict[str, tuple[str, str]]:
        return auxiliary_inputs(self)

    def function_rewards(self) -> list[str]:
        return [f for f in (self.reward.function, self.eval.checker, *(a.function for a in self.auxiliary)) if f]

    def role_configs(self) -> dict[str, Any]:
        return {"policy_trainer": self.trainer, "reference": self.reference_group, "reward": self.reward_group,
                "rollout": self.rollout}

    @model_validator(mode="after")
    def _consistent(self) -> OnPolicyDPOStage:
        s = self.schedule
        check_batches(s.pairs_per_update, s.pairs_per_microbatch, self.trainer.num_workers, "pairs", "pairs_per_update")
        if self.selection.method == "rso" and self.selection.rso_samples > self.sampling.samples_per_prompt:
            raise ValueError(f"selection.rso_samples: {self.selection.rso_samples} accepted of "
                             f"{self.sampling.samples_per_prompt} samples per prompt is impossible")
        check_model_len(self)
        check_auxiliary(self)
        return self
