"""PPO and critic-free policy-gradient estimators as pure tensor functions.

Shapes: per-token tensors are (B, T) over response tokens, with ``mask`` (B, T) = 1 on real
response tokens and 0 on padding (responses are right-padded). Nothing here takes a config object.

References:
    PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped objective, eq. 7).
    GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
        Estimation", eq. 16.
    Adaptive KL: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2.
    KL estimators k1/k3: Schulman 2020, "Approximating KL Divergence" (blog note).
    Dual clip: Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", eq. 5.
    GRPO: Shao et al. 2024, "DeepSeekMath", §4.1 (outcome supervision).
    DAPO: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (clip-higher,
        token-level loss).
    Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (no std
        scaling, a constant loss normaliser).
    RLOO: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization", eq. 6.
    REINFORCE++: Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning LLMs".
    Truncated importance sampling: Espeholt et al. 2018, "IMPALA" (V-trace's truncated weights,
        eq. 1); decoupled behaviour and proximal policies: Hilton et al. 2022, "Batch size-invariance
        for policy optimization" (eq. 4); its use against rollout-engine staleness and mismatch: Yao
        et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training".
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked entries (unbiased variance); padding stays 0."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = (((x - mean) ** 2) * mask).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) on tokens sampled from π.

    k1 = log π − log π_ref (unbiased, can be negative); k3 = (ρ − 1) − log ρ with
    ρ = π_ref/π (unbiased and never negative).
    """
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k3)")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, *, kl_coef: float,
                  no_eos: torch.Tensor | None = None, missing_eos_penalty: float = 0.0) -> torch.Tensor:
    """Per-token reward: −kl_coef · KL on every response token, plus the sequence score on the
    last response token (where the sequence's outcome is known; the critic learns to carry it back).

    Args:
        scores: (B,) sequence scores from the reward.
        kl: (B, T) per-token KL estimates.
        no_eos: (B,) bool, responses that ended without EOS (truncated); they get
            ``−missing_eos_penalty`` added to their score.
    """
    rewards = -kl_coef * kl * mask
    # the last masked-in token (a multi-turn trajectory's mask has holes: the environment's tokens)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, torch.zeros_like(positions)).max(dim=1).values
    seq = scores.clone().to(rewards.dtype)
    if no_eos is not None and missing_eos_penalty:
        seq = seq - missing_eos_penalty * no_eos.to(seq.dtype)
    rewards[torch.arange(rewards.shape[0]), last] += seq
    return rewards


class AdaptiveKLController:
    """Ziegler et al. 2019: β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n_steps/horizon)."""

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        self.value = init_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimates and returns, (B, T) each, zero on padding.

    δ_t = r_t + γ·V_{t+1} − V_t with V beyond the last response token = 0 (the episode ends);
    A_t = δ_t + γλ·A_{t+1}; returns = A + V.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        # padding passes the future through unchanged so that right padding never cuts an episode
        next_value = torch.where(m.bool(), values[:, t], next_value)
        next_adv = torch.where(m.bool(), adv, next_adv)
    return advantages, (advantages + values) * mask


LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def overlong_penalty(lengths: torch.Tensor, *, max_tokens: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to ``max_tokens − buffer``
    response tokens, then falling linearly to −``penalty`` at ``max_tokens``, −``penalty`` beyond.

    Args:
        lengths: (B,) response token counts.

    Returns:
        (B,) the penalty to add to each sequence score (≤ 0).
    """
    if not 0 < buffer <= max_tokens:
        raise ValueError(f"need 0 < buffer <= max_tokens, got buffer={buffer}, max_tokens={max_tokens}")
    over = (lengths.to(torch.float32) - (max_tokens - buffer)).clamp(min=0, max=buffer)
    return -penalty * over / buffer


def aggregate_loss(loss: torch.Tensor, mask: torch.Tensor, how: str = "token_mean",
                   norm_tokens: int | None = None) -> torch.Tensor:
    """A scalar from per-token losses (B, T): ``token_mean`` Σ over all tokens / their number;
    ``seq_mean_token_mean`` the mean over sequences of each one's token mean; ``seq_mean_token_sum_norm``
    Σ over all tokens / (B · T), a constant normaliser (Dr. GRPO; T = ``norm_tokens``, by default the
    mask's width: a caller that cuts a batch into pieces of other widths passes the generation budget)."""
    if how == "token_mean":
        return masked_mean(loss, mask)
    if how == "seq_mean_token_mean":
        return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if how == "seq_mean_token_sum_norm":
        return (loss * mask).sum() / (mask.shape[0] * (norm_tokens or mask.shape[-1]))
    raise ValueError(f"unknown loss_agg {how!r}; expected one of {LOSS_AGGREGATIONS}")


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                clip_eps: float, clip_eps_high: float | None = None, loss_agg: str = "token_mean",
                dual_clip: float | None = None, is_weights: torch.Tensor | None = None, norm_tokens: int | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate, with the optional dual clip for A < 0.

    The ratio is clipped to [1 − clip_eps, 1 + clip_eps_high] (DAPO's clip-higher, Yu et al. 2025;
    ``clip_eps_high`` None = ``clip_eps``, symmetric), and the per-token losses are aggregated by
    ``loss_agg`` (``aggregate_loss``, with its ``norm_tokens``; ``token_mean`` by default).

    ``is_weights`` (B, T), when given, multiply each token's clipped loss: the truncated importance
    weights of stale samples (``truncated_is_weights``; ``old_logps`` is then the proximal policy,
    the trainer before this iteration's update, and the weights correct from the behaviour policy
    that sampled to it; Hilton et al. 2022, eq. 4).

    Returns the loss and ``policy/clipfrac`` and ``policy/approxkl`` (½·mean((log ρ)²)).
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    loss = torch.maximum(loss1, loss2)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    if is_weights is not None:
        loss = loss * is_weights.detach()
    stats = {
        "policy/clipfrac": masked_mean((loss2 > loss1).float(), mask).detach(),
        "policy/approxkl": (0.5 * masked_mean(log_ratio**2, mask)).detach(),
    }
    return aggregate_loss(loss, mask, loss_agg, norm_tokens), stats


def truncated_is_weights(proximal_logps: torch.Tensor, behaviour_logps: torch.Tensor, mask: torch.Tensor, *,
                         cap: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token importance weights min(π_prox / μ, cap) of tokens sampled by the behaviour policy μ
    (the rollout engine's weights version) and trained from the proximal policy π_prox (the trainer's
    log-probs of the same tokens before the update), all (B, T); 0 on padding. Truncation at ``cap``
    bounds the variance (IMPALA's ρ̄; Yao et al. 2025 use 2).

    Returns the weights and ``is/weight_mean`` (of the truncated weights), ``is/clip_frac`` (share of
    tokens whose weight was truncated) and ``is/ratio_max`` (the largest untruncated ratio).
    """
    if cap < 1.0:
        raise ValueError(f"cap must be >= 1, got {cap}")
    ratio = torch.exp(proximal_logps - behaviour_logps) * mask
    weights = torch.clamp(ratio, max=cap)
    stats = {"is/weight_mean": masked_mean(weights, mask), "is/clip_frac": masked_mean((ratio > cap).float(), mask),
             "is/ratio_max": ratio.max() if ratio.numel() else torch.tensor(0.0)}
    return weights, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               clip_eps: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """½·max((V − R)², (V_clipped − R)²), V_clipped = V_old + clip(V − V_old, ±clip_eps)."""
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    loss1 = (values - returns) ** 2
    loss2 = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss1, loss2), mask)
    return loss, {"val/clipfrac": masked_mean((loss2 > loss1).float(), mask).detach()}


def informative_groups(scores: torch.Tensor, group_size: int, tol: float = 1e-9) -> torch.Tensor:
    """(B,) scores in consecutive groups → (B / group_size,) bool: True where the group's scores are
    not all equal (within ``tol``). A group of equal scores has zero group-baseline advantage for every
    sample: DAPO's dynamic sampling (Yu et al. 2025, eq. 11) drops it."""
    g = scores.view(-1, group_size)
    return (g.max(dim=1).values - g.min(dim=1).values) > tol


def grpo_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """(B,) → (B,): (r − mean of its group) / (std of its group + eps); groups are consecutive.
    ``scale=False`` leaves out the division: r − group mean (Dr. GRPO, Liu et al. 2025)."""
    g = scores.view(-1, group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) → (B,): r_i − mean of the other K − 1 rewards of its group (sums to 0 per group)."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    g = scores.view(-1, group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).view(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++: per-token discounted returns of the token rewards (score + KL penalty),
    whitened over every token of the batch (a global baseline, no critic)."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        # unmasked tokens (padding, an environment's tokens) pass the future return through
        running = torch.where(mask[:, t].bool(), rewards[:, t] + gamma * running, running)
        returns[:, t] = running * mask[:, t]
    return masked_whiten(returns, mask)


def sequence_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence-level advantage (B,) given to each response token (B, T)."""
    return advantages[:, None] * mask


def estimate_advantages(estimator: str, rewards: torch.Tensor, mask: torch.Tensor, *,
                        values: torch.Tensor | None = None, group_size: int = 1, gamma: float = 1.0,
                        lam: float = 0.95, whiten: bool = True, scale: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token advantages (B, T) from per-token rewards (B, T) (``token_rewards``), and value targets.

    - ``ppo``: GAE(γ, λ) over the critic's ``values`` (B, T); whitened over the batch's tokens when
      ``whiten``; returns = A + V are the critic's targets.
    - ``grpo`` / ``rloo``: the sequence return Σ_t r_t (score plus any in-reward KL, undiscounted:
      these are bandit estimators, γ is not used) against its group's baseline, given to every token;
      ``grpo`` divides by the group's std unless ``scale`` is False (Dr. GRPO).
      Groups are ``group_size`` consecutive rows (the samples of one prompt).
    - ``reinforce_pp``: discounted token returns, whitened over the batch.

    The critic-free estimators return no value targets (None).
    """
    if estimator == "ppo":
        if values is None:
            raise ValueError("the ppo estimator needs critic values")
        advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
        return (masked_whiten(advantages, mask) if whiten else advantages), returns
    if estimator == "reinforce_pp":
        return reinforce_pp_advantages(rewards, mask, gamma=gamma), None
    sequence_return = (rewards * mask).sum(dim=1)
    if estimator == "grpo":
        return sequence_to_tokens(grpo_advantages(sequence_return, group_size, scale=scale), mask), None
    if estimator == "rloo":
        return sequence_to_tokens(rloo_advantages(sequence_return, group_size), mask), None
    raise ValueError(f"unknown estimator {estimator!r} (ppo, grpo, rloo, reinforce_pp)")


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(returns − values) / Var(returns) over masked tokens: 1 is a perfect critic, ≤ 0 a useless one."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return float(1.0 - var_residual / var_returns) if var_returns > 0 else float("nan")
