"""The configuration of ``kind: ppo`` below the stage: sampling, the estimator and its objectives, the
KL penalty, the schedule and the critic (``pipelines.stages.ppo.PPOStage`` holds them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines.stages.base import Frozen, PathOrRef
from pipelines.stages.config import OptimConfig
from pipelines.stages.online import OnlineSchedule, OnPolicySamplingConfig


class PPOSamplingConfig(OnPolicySamplingConfig):
    """Samples per prompt may be 1 for ``ppo`` and ``reinforce_pp``; ``grpo``/``rloo`` need K ≥ 2.
    ``dynamic``: DAPO's dynamic sampling (``stages.dynamic_sampling``: prompts whose K rewards are all
    equal are dropped and more are sampled, in at most ``dynamic_max_rounds`` rounds; ``dynamic/*``)."""

    samples_per_prompt: int = Field(4, ge=1, description="K")
    dynamic: bool = Field(False, description="drop prompts whose K rewards are all equal and sample more (DAPO)")
    dynamic_max_rounds: int = Field(3, ge=1, description="generation rounds per iteration at most (dynamic)")


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
        "ppo", description="ppo: critic + GAE; grpo: group mean/std; rloo: leave-one-out; "
        "reinforce_pp: global whitening")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ (ppo)")
    whiten_advantages: bool = Field(True, description="ppo: whiten GAE advantages over the batch's tokens")
    clip_eps: float = Field(0.2, gt=0, lt=1,
                            description="ε of the clipped surrogate (its lower side with clip_eps_high)")
    clip_eps_high: float | None = Field(
        None, gt=0, description="upper clip: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high] (DAPO's "
        "clip-higher, e.g. 0.28); null = clip_eps")
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field(
        "token_mean", description="policy loss over tokens: token_mean (every token of the batch alike: DAPO), "
        "seq_mean_token_mean (each sequence's mean, then the mean over sequences: GRPO's paper), "
        "seq_mean_token_sum_norm (sum / (sequences x sampling.max_new_tokens): Dr. GRPO)")
    scale_advantages: bool = Field(True, description="grpo: divide by the group's reward std (false: Dr. GRPO)")
    overlong_buffer: int = Field(
        0, ge=0, description="DAPO's overlong shaping: the score falls linearly by up to overlong_penalty over the "
        "last overlong_buffer tokens of sampling.max_new_tokens (0 = off)")
    overlong_penalty: float = Field(1.0, ge=0, description="the score penalty at the full length budget")
    dual_clip: float | None = Field(None, gt=1,
                                    description="c of the dual clip for negative advantages (Ye et al. 2020)")
    value_clip_eps: float = Field(0.2, gt=0, description="clip of V − V_old in the value loss")
    missing_eos_penalty: float = Field(0.0, ge=0, description="subtracted from the score of responses without EOS")
    is_cap: float = Field(
        2.0, ge=1, description="rollout.max_staleness > 0: each token's loss is weighted by min(π_prox/μ, is_cap), "
        "the truncated importance weight from the rollout version μ that sampled it to the trainer before the update")
    kl: KLConfig = KLConfig()


class PPOScheduleConfig(OnlineSchedule):
    """Iterations of rollout → score → ref/values → advantages → update → sync (``ppo``, ``distill``)."""

    ppo_epochs: int = Field(1, ge=1, description="passes over each iteration's samples")
    minibatches_per_epoch: int = Field(1, ge=1, description="optimizer steps per pass (policy and critic each)")
    samples_per_microbatch: int = Field(16, ge=1, description="samples in one forward/backward on one worker")

    @property
    def updates_per_iteration(self) -> int:
        return self.ppo_epochs * self.minibatches_per_epoch

    def samples_per_minibatch(self, samples_per_prompt: int) -> int:
        return self.prompts_per_iteration * samples_per_prompt // self.minibatches_per_epoch

    def trainer_steps(self, samples_per_prompt: int) -> tuple[int, int, int]:
        """The policy trainer's (total optimizer steps, samples per step, samples per micro-batch)."""
        return (self.iterations * self.updates_per_iteration, self.samples_per_minibatch(samples_per_prompt),
                self.samples_per_microbatch)


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
    optim: OptimConfig | None = Field(None, description="the critic's AdamW and schedule; default: the policy's "
                                      "(optim)")
