"""``kind: ppo``: online RL from a reward, with a critic (PPO) or a critic-free baseline (GRPO, RLOO, REINFORCE++).

Each iteration is a sequence of named, timed phases (``timing/<phase>_s``, and ``timing/<phase>_frac``:
its share of the iteration's step time) over actors that live for the whole stage:

``rollout`` (vLLM workers sample K responses per prompt) → ``score`` (the reward role) →
``ref_logprobs`` (reference role) → ``policy_logprobs`` (the trainer's own log-probs of the sampled
tokens: the π_old of the ratio, and ``rollout/logprob_gap``) → ``values`` (critic, ``ppo`` only) →
``advantages`` (pure functions of ``pipelines.algorithms.ppo``) → ``update`` (``ppo_epochs`` passes of
``minibatches_per_epoch`` optimizer steps; policy and critic step concurrently) → ``sync_weights``
(versioned, verified).

Reward shaping: each response token gets −β·KL (when the KL is placed in the reward) and the last
response token also gets the sequence score (``ppo.token_rewards``). Metrics follow TRL's names:
``objective/scores`` (mean sequence score), ``objective/kl`` (mean Σ_t KL estimate per sequence),
``objective/non_score_reward`` (mean Σ_t −β·KL), ``objective/rlhf_reward`` (their sum),
``objective/entropy`` (mean Σ_t −log π(y_t) of the sampled tokens), ``policy/*``, ``val/*``, ``loss/*``, ``kl/coef``.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch

from actors.batches import PPOBatch
from actors.modeling import masked_token_values
from actors.policy_trainer import PolicyTrainer
from orchestrator.weight_sync import response_logprobs
from pipelines.algorithms.ppo import (
    AdaptiveKLController,
    estimate_advantages,
    explained_variance,
    kl_estimate,
    masked_mean,
    token_rewards,
)
from pipelines.data import EpochSampler
from pipelines.losses import CriticLoss, PolicyGradientLoss
from pipelines.stages.offline_dpo import policy_inputs
from pipelines.stages.online import (
    Scored,
    due,
    evaluate,
    load_prompt_sets,
    log_sample_table,
    open_weight_sync,
    resume_online,
    sample_and_score,
    spawn_roles,
    sync_and_verify,
)
from pipelines.stages.training import spawn_trainer, train_together

if TYPE_CHECKING:
    from orchestrator.actor_group import ActorGroup
    from orchestrator.context import StageContext
    from orchestrator.ppo_config import PPOStage

PHASES = ("rollout", "score", "ref_logprobs", "policy_logprobs", "values", "advantages", "update", "sync_weights")


def response_matrix(rows: list[list[float]], width: int) -> torch.Tensor:
    """Per-response-token values (ragged rows) as a right-padded (B, width) float tensor."""
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def sequence_layout(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded (input_ids (B, T), attention_mask (B, T)) and, for moving per-response-token tensors
    (B, R) into the next-token layout (B, T-1), the column of each response token (B, R) and its mask."""
    width = max(len(p) + len(r) for p, r in sequences)
    resp = max(len(r) for _, r in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(sequences), width, dtype=torch.long)
    column = torch.zeros(len(sequences), resp, dtype=torch.long)
    mask = torch.zeros(len(sequences), resp)
    for i, (p, r) in enumerate(sequences):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attn[i, : len(p) + len(r)] = 1
        column[i, : len(r)] = torch.arange(len(p) - 1, len(p) + len(r) - 1)
        mask[i, : len(r)] = 1.0
    return ids, attn, column, mask


def to_next_token_layout(x: torch.Tensor, column: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, R) per response token → (B, width) with each token's value at its next-token column, 0 elsewhere."""
    out = torch.zeros(x.shape[0], width)
    return out.scatter_add_(1, column, x * mask)


def advantage_batch(cfg: PPOStage, scored: Scored, policy_lp: list[list[float]], values: list[list[float]] | None,
                    kl_coef: float, pad_id: int) -> tuple[PPOBatch, dict[str, float]]:
    """Phase ``advantages``: KL, shaped rewards, advantages and value targets; the training batch and
    the ``objective/*`` metrics of the iteration."""
    a = cfg.algorithm
    samples = scored.samples
    ids, attn, column, mask = sequence_layout([(x.prompt_ids, x.response_ids) for x in samples], pad_id)
    width = column.shape[1]
    old = response_matrix(policy_lp, width)
    ref = response_matrix(scored.ref_logps, width)
    scores = torch.tensor(scored.rewards, dtype=torch.float32)
    kl = kl_estimate(old, ref, a.kl.estimator_for(a.estimator)) * mask
    in_loss = a.kl.in_loss(a.estimator)
    no_eos = torch.tensor([x.finish_reason == "length" for x in samples])
    rewards = token_rewards(scores, kl, mask, kl_coef=0.0 if in_loss else kl_coef, no_eos=no_eos,
                            missing_eos_penalty=a.missing_eos_penalty)
    vals = response_matrix(values, width) if values is not None else None
    adv, returns = estimate_advantages(a.estimator, rewards, mask, values=vals, group_size=cfg.sampling.samples_per_prompt,
                                       gamma=a.gamma, lam=a.lam, whiten=a.whiten_advantages)
    non_score = (-kl_coef * kl).sum(1) if not in_loss else torch.zeros_like(scores)
    metrics = {
        "objective/scores": float(scores.mean()),
        "objective/kl": float(kl.sum(1).mean()),
        "objective/non_score_reward": float(non_score.mean()),
        "objective/rlhf_reward": float((scores + non_score).mean()),
        "objective/entropy": float((-old * mask).sum(1).mean()),
        "kl/coef": kl_coef,
        "advantages/mean": float(masked_mean(adv, mask)),
        "advantages/abs_mean": float(masked_mean(adv.abs(), mask)),
    }
    if vals is not None and returns is not None:
        metrics["val/values_mean"] = float(masked_mean(vals, mask))
        ev = explained_variance(vals, returns, mask)
        if math.isfinite(ev):
            metrics["val/explained_variance"] = ev
    t = ids.shape[1] - 1

    def layout(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else to_next_token_layout(x, column, mask, t)

    batch = PPOBatch(ids, attn, to_next_token_layout(mask, column, mask, t), layout(old), layout(adv),
                     ref_logps=layout(ref) if in_loss and kl_coef else None, old_values=layout(vals),
                     returns=layout(returns))
    return batch, metrics


def ppo_update(cfg: PPOStage, trainer: ActorGroup, critic: ActorGroup | None, batch: PPOBatch,
               policy_loss: PolicyGradientLoss, critic_loss: CriticLoss, generator: torch.Generator) -> dict[str, float]:
    """Phase ``update``: ``ppo_epochs`` shuffled passes over the iteration's samples, each in
    ``minibatches_per_epoch`` optimizer steps; the critic steps on the same minibatch concurrently.
    Metrics are means over the steps; critic metrics outside ``val/`` and ``loss/`` get a ``critic/`` prefix."""
    s = cfg.schedule
    per = len(batch) // s.minibatches_per_epoch
    n_steps = s.ppo_epochs * s.minibatches_per_epoch
    totals: dict[str, float] = {}
    for _ in range(s.ppo_epochs):
        order = torch.randperm(len(batch), generator=generator)
        for mb in range(s.minibatches_per_epoch):
            part = batch.select(order[mb * per : (mb + 1) * per])
            jobs: list[tuple[ActorGroup, Any, Any]] = [(trainer, part, policy_loss)]
            if critic is not None:
                jobs.append((critic, part, critic_loss))
            results = train_together(jobs, stage=cfg.kind, unit="samples")
            step = results[0]
            if critic is not None:
                step |= {(k if k.startswith(("val/", "loss/")) else f"critic/{k}"): v for k, v in results[1].items()}
            for name, value in step.items():
                totals[name] = totals.get(name, 0.0) + value / n_steps
    for name in ("timing/update_s", "critic/timing/update_s"):
        totals.pop(name, None)  # the phase timer covers all steps
    return totals


def spawn_critic(cfg: PPOStage, ctx: StageContext, policy_path: str) -> ActorGroup | None:
    if not cfg.uses_critic:
        return None
    s = cfg.schedule
    path = policy_path if cfg.critic.init == "policy" else (ctx.input("critic.model") or ctx.input("reward.model"))
    return spawn_trainer(ctx, role="critic", model_path=path, trainer=cfg.critic_group, optim=cfg.critic.optim,
                         steps=s.iterations * s.ppo_epochs * s.minibatches_per_epoch, per_step=cfg.samples_per_minibatch,
                         per_microbatch=s.samples_per_microbatch, seed=s.seed, model_kind="reward_model")


def phase_fractions(m: dict[str, float], step_s: float) -> dict[str, float]:
    """``timing/<phase>_frac``: each phase's share of the iteration's step time."""
    return {f"timing/{p}_frac": m[f"timing/{p}_s"] / step_s for p in PHASES if f"timing/{p}_s" in m}


def run(cfg: PPOStage, ctx: StageContext) -> dict[str, str]:
    policy_path, ref_path, tokenizer, pad_id = policy_inputs(cfg, ctx)
    s, a = cfg.schedule, cfg.algorithm
    prompts, held_out = load_prompt_sets(cfg, ctx, tokenizer)
    roles = spawn_roles(cfg, ctx, policy_path, ref_path)
    trainer = spawn_trainer(ctx, role="policy_trainer", model_path=policy_path, trainer=cfg.trainer, optim=cfg.optim,
                            steps=s.iterations * s.ppo_epochs * s.minibatches_per_epoch,
                            per_step=cfg.samples_per_minibatch, per_microbatch=s.samples_per_microbatch, seed=s.seed)
    critic = spawn_critic(cfg, ctx, policy_path)
    sync = open_weight_sync(cfg, trainer, roles, pad_id)
    kl_ctl = AdaptiveKLController(a.kl.coef, a.kl.target, a.kl.horizon) if a.kl.target else None
    critic_loss = CriticLoss(a.value_clip_eps)
    sampler = EpochSampler(len(prompts.ids), min(s.prompts_per_iteration, len(prompts.ids)), s.seed)
    generator = torch.Generator().manual_seed(s.seed)
    trainers = [trainer] + ([critic] if critic is not None else [])
    done, state = resume_online(ctx, trainers, sync)
    if done:
        generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        if kl_ctl is not None:
            kl_ctl.value = state["kl_coef"]
    elif held_out is not None:
        ctx.log_metrics(evaluate(cfg, roles, held_out), step=0)

    for it in range(done + 1, s.iterations + 1):
        m: dict[str, float] = {}
        start = time.perf_counter()
        kl_coef = kl_ctl.value if kl_ctl else a.kl.coef
        scored, policy_lp = sample_and_score(cfg, ctx, roles, trainer, prompts, sampler.indices(it - 1), it, pad_id, m)
        values = None
        if critic is not None:
            with ctx.timed("values", m):
                values = response_logprobs(critic, PolicyTrainer.evaluate,
                                           [(x.prompt_ids, x.response_ids) for x in scored.samples], pad_id,
                                           fn=masked_token_values)
        with ctx.timed("advantages", m):
            batch, objective = advantage_batch(cfg, scored, policy_lp, values, kl_coef, pad_id)
        m.update(objective)
        policy_loss = PolicyGradientLoss(a.clip_eps, a.dual_clip, kl_coef if a.kl.in_loss(a.estimator) else 0.0,
                                         a.kl.estimator_for(a.estimator))
        with ctx.timed("update", m):
            m.update(ppo_update(cfg, trainer, critic, batch, policy_loss, critic_loss, generator))
        sync_and_verify(cfg, ctx, sync, scored, m)
        step_s = time.perf_counter() - start
        m["timing/step_s"] = step_s
        m.update(phase_fractions(m, step_s))
        if kl_ctl is not None:
            kl_ctl.update(objective["objective/kl"], len(scored.samples))
        m["policy_version"] = float(sync.version)
        log_sample_table(ctx, scored, cfg.eval.table_rows, it)
        if held_out is not None and due(it, s.iterations, s.eval_every):
            m.update(evaluate(cfg, roles, held_out))
        ctx.log_metrics(m, step=it)
        ctx.report_progress(it, s.iterations, m)
        if ctx.checkpoint_due(it, s.iterations):
            ctx.save_checkpoint(it, trainers, {"generator": generator.get_state().tolist(), "version": sync.version,
                                               "kl_coef": kl_ctl.value if kl_ctl else a.kl.coef})

    out_dir = str(ctx.stage_dir / "model")
    trainer.broadcast(PolicyTrainer.save_hf, out_dir)
    return {"model": out_dir}
