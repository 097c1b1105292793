"""``kind: ppo``: online RL from a reward, with a critic (PPO) or a critic-free baseline (GRPO, RLOO,
REINFORCE++), and DAPO's and Dr. GRPO's changes as options.

The loop (``online_loop.run_online``) samples, scores and computes the reference and π_old log-probs; ``PPO``
adds the critic's ``values`` (``ppo`` only) beside them, then per iteration ``advantages`` (pure functions of
``pipelines.algorithms.ppo``) → ``update`` (``ppo_epochs`` passes of ``minibatches_per_epoch`` optimizer
steps; policy and critic step concurrently) and moves the adaptive KL coefficient. Reward shaping: each
response token gets −β·KL (when the KL is placed in the reward) and the last one the sequence score
(``ppo.token_rewards``). Metrics follow TRL's names: ``objective/kl`` (mean Σ_t KL estimate per sequence),
``objective/non_score_reward`` (mean Σ_t −β·KL), ``objective/rlhf_reward`` (their sum with the score),
``objective/entropy`` (mean Σ_t −log π(y_t)), ``policy/*``, ``val/*``, ``loss/*``, ``kl/coef``. With an
``environment`` the samples are multi-turn trajectories: only the policy's tokens carry advantages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import model_validator

from actors.modeling import masked_token_values
from actors.policy_trainer import PolicyTrainer
from orchestrator.runtime.weight_sync import ResponseValues, submit_response_logprobs
from pipelines.algorithms.ppo import (
    AdaptiveKLController,
    estimate_advantages,
    explained_variance,
    kl_estimate,
    masked_mean,
    overlong_penalty,
    token_rewards,
    truncated_is_weights,
)
from pipelines.data.batches import PPOBatch, response_matrix, sequence_layout, to_next_token_layout
from pipelines.losses import CriticLoss, PolicyGradientLoss
from pipelines.stages.base import Metric, StageKind, trainer_numbers
from pipelines.stages.config import TrainerConfig
from pipelines.stages.online import OnlineStage, Scored, Sequences
from pipelines.stages.online_loop import run_online
from pipelines.stages.ppo_config import (
    CriticConfig,
    PPOAlgorithmConfig,
    PPOSamplingConfig,
    PPOScheduleConfig,
)
from pipelines.stages.training import mean_over_steps, spawn_trainer, train_together

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import ActorGroup
    from orchestrator.runtime.context import StageContext


class PPOStage(OnlineStage):
    """Online RL from a reward: PPO with a critic, or a critic-free group/global baseline."""

    kind: Literal["ppo"]
    algorithm: PPOAlgorithmConfig = PPOAlgorithmConfig()
    sampling: PPOSamplingConfig = PPOSamplingConfig()
    critic: CriticConfig = CriticConfig()
    schedule: PPOScheduleConfig = PPOScheduleConfig()
    critic_group: TrainerConfig = TrainerConfig()
    ROLE_CPUS: ClassVar[dict[str, float]] = OnlineStage.ROLE_CPUS | {"critic": 0.25, "rollout": 0.75}  # 2 in all
    ROLE_FIELDS: ClassVar[dict[str, str]] = OnlineStage.ROLE_FIELDS | {"critic": "critic_group"}
    ROLES: ClassVar[tuple[str, ...]] = ("policy_trainer", "critic", "reference", "reward", "rollout", "environment")
    PHASES: ClassVar[tuple[tuple[str, ...], ...]] = (ROLES,)
    INPUTS: ClassVar[dict[str, tuple[str, str]]] = {
        "policy": ("model", "model"),
        "reference": ("model", "model"),
        "reward.model": ("reward_model", "reward_model"),
        "reward.judge.model": ("model", "model"),
        "critic.model": ("reward_model", "reward_model"),
        "data.train": ("prompts", "prompts_train"),
        "data.eval": ("prompts", "prompts_eval"),
    }
    HEADLINE: ClassVar[tuple[Metric, ...]] = (*OnlineStage.HEADLINE[:2], Metric("loss/policy", "pg_loss"),
                                               *OnlineStage.HEADLINE[3:])

    @property
    def uses_critic(self) -> bool:
        return self.algorithm.estimator == "ppo"

    @property
    def samples_per_minibatch(self) -> int:
        return self.schedule.samples_per_minibatch(self.sampling.samples_per_prompt)

    def dynamic_sampling(self) -> int | None:
        return self.sampling.dynamic_max_rounds if self.sampling.dynamic else None

    def old_logprobs_in_update(self) -> bool:
        """π_old taken in the update call (detached log-probs of its forward; no separate forward): one
        optimizer step per batch, no critic, the KL (if any) in the loss, not the reward."""
        s, a = self.schedule, self.algorithm
        return (self.rollout.old_logprobs == "trainer" and s.ppo_epochs * s.minibatches_per_epoch == 1
                and not self.uses_critic and (a.kl.in_loss(a.estimator) or not a.kl.coef))

    def trainer_configs(self) -> dict[str, Any]:
        return {"policy_trainer": self.trainer} | ({"critic": self.critic_group} if self.uses_critic else {})

    def own_roles(self) -> dict[str, Any]:
        return self.trainer_configs() | super().own_roles()

    def numbers(self) -> dict[str, float | str]:
        s, t = self.schedule, self.trainer
        updates = s.updates_per_iteration
        steps, per_step, per_micro = s.trainer_steps(self.sampling.samples_per_prompt)
        numbers = trainer_numbers("samples", per_step, per_micro, steps, t.num_workers, t.zero_stage, 1)
        return numbers | self.online_numbers() | {"optimizer_steps_per_iteration": updates}

    @model_validator(mode="after")
    def _consistent(self) -> PPOStage:
        s, est, k = self.schedule, self.algorithm.estimator, self.sampling.samples_per_prompt
        if est in ("grpo", "rloo") and k < 2:
            raise ValueError(f"sampling.samples_per_prompt: {est} compares samples of one prompt, it needs >= 2, "
                             f"got {k}")
        if self.sampling.dynamic and k < 2:
            raise ValueError("sampling.dynamic: drops prompts whose samples' rewards are all equal, it needs "
                             f"samples_per_prompt >= 2, got {k}")
        if self.sampling.dynamic and self.rollout.max_staleness:
            raise ValueError("sampling.dynamic: not available with rollout.max_staleness > 0 (the refill rounds "
                             "sample with the current policy); set one of them off")
        if self.algorithm.overlong_buffer > self.sampling.max_new_tokens:
            raise ValueError(f"algorithm.overlong_buffer: {self.algorithm.overlong_buffer} exceeds "
                             f"sampling.max_new_tokens ({self.sampling.max_new_tokens})")
        if (s.prompts_per_iteration * k) % s.minibatches_per_epoch:
            raise ValueError(f"schedule.minibatches_per_epoch: {s.minibatches_per_epoch} does not divide the "
                             f"{s.prompts_per_iteration * k} samples of an iteration (prompts_per_iteration x "
                             "samples_per_prompt)")
        for role, group in self.trainer_configs().items():
            per_worker, rest = divmod(self.samples_per_minibatch, group.num_workers)
            if rest or per_worker % s.samples_per_microbatch:
                name = "trainer" if role == "policy_trainer" else "critic_group"
                raise ValueError(f"schedule.samples_per_microbatch: a minibatch of {self.samples_per_minibatch} "
                                 f"samples must split into {name}.num_workers = {group.num_workers} equal shards of "
                                 f"whole micro-batches of {s.samples_per_microbatch}")
        no_model = (self.reward is None or self.reward.model is None) and self.critic.model is None
        if self.uses_critic and self.critic.init == "reward_model" and no_model:
            raise ValueError("critic.init: reward_model needs critic.model or reward.model (a reward-model checkpoint)")
        for i, roles in enumerate(self.placement.colocate):
            if "critic" in roles and not self.uses_critic:
                raise ValueError(f"placement.colocate[{i}]: estimator {est} has no critic role")
        return self


def advantage_batch(cfg: PPOStage, scored: Scored, policy_lp: list[list[float]], values: list[list[float]] | None,
                    kl_coef: float, pad_id: int) -> tuple[PPOBatch, dict[str, float]]:
    """Phase ``advantages``: KL, shaped rewards, advantages and value targets; the training batch and
    the ``objective/*`` metrics of the iteration."""
    a, samples = cfg.algorithm, scored.samples
    ids, attn, column, mask = sequence_layout([(x.prompt_ids, x.response_ids) for x in samples], pad_id,
                                              [x.sampled_mask() for x in samples])  # trajectories: the policy's
    width = column.shape[1]
    old = response_matrix(policy_lp, width)
    ref = response_matrix(scored.ref_logps, width)
    scores = torch.tensor(scored.rewards, dtype=torch.float32)
    overlong = None
    if a.overlong_buffer:  # DAPO's soft overlong punishment, on the score
        overlong = overlong_penalty(mask.sum(1), max_tokens=cfg.sampling.max_new_tokens, buffer=a.overlong_buffer,
                                    penalty=a.overlong_penalty)
        scores = scores + overlong
    kl = kl_estimate(old, ref, a.kl.estimator_for(a.estimator)) * mask
    in_loss = a.kl.in_loss(a.estimator)
    no_eos = torch.tensor([x.finish_reason == "length" for x in samples])
    rewards = token_rewards(scores, kl, mask, kl_coef=0.0 if in_loss else kl_coef, no_eos=no_eos,
                            missing_eos_penalty=a.missing_eos_penalty)
    is_weights, fused = None, cfg.old_logprobs_in_update()  # fused: ``old`` is the engine's; the loss takes π_old
    if cfg.rollout.max_staleness and not fused:  # stale samples: correct from the rollout version that sampled them
        behaviour = response_matrix([x.logprobs for x in samples], width)
        is_weights, is_stats = truncated_is_weights(old, behaviour, mask, cap=a.is_cap)
    vals = response_matrix(values, width) if values is not None else None
    adv, returns = estimate_advantages(a.estimator, rewards, mask, values=vals,
                                       group_size=cfg.sampling.samples_per_prompt, gamma=a.gamma, lam=a.lam,
                                       whiten=a.whiten_advantages, scale=a.scale_advantages)
    non_score = (-kl_coef * kl).sum(1) if not in_loss else torch.zeros_like(scores)
    metrics = {
        "objective/kl": float(kl.sum(1).mean()),
        "objective/non_score_reward": float(non_score.mean()),
        "objective/rlhf_reward": float((scores + non_score).mean()),
        "objective/entropy": float((-old * mask).sum(1).mean()),
        "kl/coef": kl_coef,
        "advantages/mean": float(masked_mean(adv, mask)),
        "advantages/abs_mean": float(masked_mean(adv.abs(), mask)),
    }
    if is_weights is not None:
        metrics |= {name: float(value) for name, value in is_stats.items()}
    if overlong is not None:
        metrics["objective/overlong_penalty"] = float(overlong.mean())
    if vals is not None and returns is not None:
        metrics["val/values_mean"] = float(masked_mean(vals, mask))
        ev = explained_variance(vals, returns, mask)
        if math.isfinite(ev):
            metrics["val/explained_variance"] = ev
    t = ids.shape[1] - 1

    def layout(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else to_next_token_layout(x, column, mask, t)

    batch = PPOBatch(ids, attn, to_next_token_layout(mask, column, mask, t), None if fused else layout(old),
                     layout(adv), ref_logps=layout(ref) if in_loss and kl_coef else None, old_values=layout(vals),
                     returns=layout(returns), is_weights=layout(is_weights),
                     behaviour_logps=layout(old) if fused else None)
    return batch, metrics


def policy_loss_of(cfg: PPOStage, kl_coef: float) -> PolicyGradientLoss:
    """The policy loss as ``algorithm`` configures it; ``seq_mean_token_sum_norm`` normalises by the
    generation budget (``sampling.max_new_tokens``), the same for every micro-batch."""
    a, stale = cfg.algorithm, cfg.rollout.max_staleness and cfg.old_logprobs_in_update()
    return PolicyGradientLoss(a.clip_eps, a.dual_clip, kl_coef if a.kl.in_loss(a.estimator) else 0.0,
                              a.kl.estimator_for(a.estimator), a.clip_eps_high, a.loss_agg,
                              cfg.sampling.max_new_tokens, a.is_cap if stale else None)


def ppo_update(s: PPOScheduleConfig, stage: str, trainer: ActorGroup, critic: ActorGroup | None,
               batch: PPOBatch, policy_loss: PolicyGradientLoss, critic_loss: CriticLoss, generator: torch.Generator
               ) -> dict[str, float]:
    """Phase ``update``: ``ppo_epochs`` shuffled passes over the iteration's samples, each in
    ``minibatches_per_epoch`` optimizer steps; the critic steps on the same minibatch concurrently.
    Metrics are means over the steps; critic metrics outside ``val/`` and ``loss/`` get a ``critic/`` prefix."""
    per = len(batch) // s.minibatches_per_epoch

    def steps() -> Iterator[dict[str, float]]:
        for _ in range(s.ppo_epochs):
            order = torch.randperm(len(batch), generator=generator)
            for mb in range(s.minibatches_per_epoch):
                part = batch.select(order[mb * per : (mb + 1) * per])
                jobs: list[tuple[ActorGroup, Any, Any]] = [(trainer, part, policy_loss)]
                jobs += [(critic, part, critic_loss)] if critic is not None else []
                results = train_together(jobs, stage=stage, unit="samples")
                yield results[0] | ({(k if k.startswith(("val/", "loss/")) else f"critic/{k}"): v
                                     for k, v in results[1].items()} if critic is not None else {})

    return mean_over_steps(steps(), s.ppo_epochs * s.minibatches_per_epoch)


class PPO:
    """The policy-gradient part of an iteration (``run_online`` does the rest): ``values`` (critic,
    ``ppo`` only, a forward beside the reference and policy log-probs) → ``advantages`` → ``update``;
    the adaptive KL coefficient moves after each update."""

    def __init__(self, cfg: PPOStage) -> None:
        a = cfg.algorithm
        self.cfg = cfg
        self.kl_ctl = AdaptiveKLController(a.kl.coef, a.kl.target, a.kl.horizon) if a.kl.target else None
        self.critic_loss = CriticLoss(a.value_clip_eps)
        self.generator = torch.Generator().manual_seed(cfg.schedule.seed)
        self.trainer: ActorGroup | None = None
        self.critic: ActorGroup | None = None
        self.pad_id = 0

    def trainer_steps(self) -> tuple[int, int, int]:
        return self.cfg.schedule.trainer_steps(self.cfg.sampling.samples_per_prompt)

    def spawn(self, ctx: StageContext, trainer: ActorGroup, policy_path: str, pad_id: int) -> list[ActorGroup]:
        """The critic (``ppo`` only): from the policy's trunk, or a reward-model checkpoint, head included."""
        cfg, s = self.cfg, self.cfg.schedule
        self.trainer, self.pad_id = trainer, pad_id
        if not cfg.uses_critic:
            return []
        path = policy_path if cfg.critic.init == "policy" else (ctx.input("critic.model") or ctx.input("reward.model"))
        self.critic = spawn_trainer(ctx, role="critic", model_path=path, trainer=cfg.critic_group,
                                    optim=cfg.critic.optim or cfg.optim, steps=self.trainer_steps()[0],
                                    per_step=cfg.samples_per_minibatch,
                                    per_microbatch=s.samples_per_microbatch, seed=s.seed, model_kind="reward_model")
        return [self.critic]

    def restore(self, done: int, state: dict[str, Any]) -> None:
        if not done:  # a fresh start, or a rollback to it
            self.generator.manual_seed(self.cfg.schedule.seed)
            if self.kl_ctl is not None:
                self.kl_ctl.value = self.cfg.algorithm.kl.coef
            return
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        if self.kl_ctl is not None:
            self.kl_ctl.value = state["kl_coef"]

    def forwards(self) -> dict[str, Callable[[Sequences], ResponseValues]]:
        if self.critic is None:
            return {}
        return {"values": lambda seqs: submit_response_logprobs(self.critic, PolicyTrainer.evaluate, seqs, self.pad_id,
                                                                fn=masked_token_values)}

    @property
    def kl_coef(self) -> float:
        return self.kl_ctl.value if self.kl_ctl else self.cfg.algorithm.kl.coef

    def learn(self, ctx: StageContext, iteration: int, scored: Scored, policy_lp: list[list[float]],
              m: dict[str, float]) -> bool:
        cfg, kl_coef = self.cfg, self.kl_coef
        values = scored.forwards.get("values")
        with ctx.log.timed("advantages", m):
            batch, objective = advantage_batch(cfg, scored, policy_lp, values, kl_coef, self.pad_id)
        m.update(objective)
        policy_loss = policy_loss_of(cfg, kl_coef)
        with ctx.log.timed("update", m):
            m.update(ppo_update(cfg.schedule, cfg.name, self.trainer, self.critic, batch, policy_loss, self.critic_loss,
                                self.generator))
        if self.kl_ctl is not None:
            self.kl_ctl.update(objective["objective/kl"], len(scored.samples))
        return True

    def state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state().tolist(), "kl_coef": self.kl_coef}

    def outputs(self, ctx: StageContext) -> dict[str, str]:
        return {}


def run(cfg: PPOStage, ctx: StageContext) -> dict[str, str]:
    return run_online(cfg, ctx, PPO(cfg))


STAGE = StageKind(PPOStage, run)
