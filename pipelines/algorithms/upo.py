"""Unified Preference Optimization (UPO): a preference loss plus an advantage-weighted auxiliary
likelihood for a designer's rewards, as pure tensor functions.

Reference:
    Badrinath, Agarwal, Xu 2024, "Unified Preference Optimization: Language Model Alignment Beyond
    the Preference Frontier" (arXiv 2405.17956; v1 titled "Hybrid Preference Optimization").
    Advantage-weighted regression: Peng et al. 2019, "Advantage-Weighted Regression"; the weight
    exp(A/τ) is the closed-form solution of the KL-regularised improvement step.

The objective here::

    L = L_pref(θ) + λ · L_aux(θ)
    L_aux = − mean_i [ w_i · log π_θ(y_i | x_i) / |y_i| ]        over every response in the batch
    w_i = min(exp(A_i / τ), w_max)
    A_i = Σ_k c_k · r_k(x_i, y_i) − b(x_i)

Baselines b(x): the paper fits a value V(x) by expectile regression (as in IQL; ``upo.baseline:
value``): here a linear head on the starting policy's last-layer state at the prompt's last token,
fitted once, before training, by iteratively reweighted least squares (``fit_expectile_value``).
The value-free default (``group_mean``) is the mean weighted auxiliary reward of the responses to
the same prompt (with a chosen and a rejected response per prompt the two advantages are
±(R_w − R_l)/2). The preference term is the stage's loss: any DPO-family loss, or KTO (the paper's
main variant). The weights do not depend on θ: they are computed once per response and cached.
"""

from __future__ import annotations

import torch


def weighted_auxiliary_reward(rewards: torch.Tensor, coefs: torch.Tensor) -> torch.Tensor:
    """R_i = Σ_k c_k · r_k(x_i, y_i).

    Args:
        rewards: [N, K] auxiliary reward k of response i.
        coefs: [K] designer weights c_k.

    Returns:
        [N] weighted auxiliary reward per response.
    """
    if rewards.dim() != 2 or coefs.shape != rewards.shape[1:]:
        raise ValueError(f"rewards must be [N, K] and coefs [K]; got {tuple(rewards.shape)} and {tuple(coefs.shape)}")
    return rewards @ coefs.to(rewards.dtype)


def group_mean_baseline(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """b_i = mean of ``values`` over the responses that share response i's prompt (group).

    Args:
        values: [N] per-response values.
        group_ids: [N] integer prompt id of each response (any integers; equal = same prompt).

    Returns:
        [N] the group mean, broadcast back to each response.
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)
    groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    sums = torch.zeros(groups, dtype=values.dtype).index_add_(0, inverse, values)
    counts = torch.zeros(groups, dtype=values.dtype).index_add_(0, inverse, torch.ones_like(values))
    return (sums / counts)[inverse]


def auxiliary_advantages(rewards: torch.Tensor, coefs: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """A_i = Σ_k c_k r_k(x_i, y_i) − b(x_i) with the group-mean baseline. Shapes as above; [N]."""
    total = weighted_auxiliary_reward(rewards, coefs)
    return total - group_mean_baseline(total, group_ids)


def expectile_loss(predictions: torch.Tensor, targets: torch.Tensor, *, expectile: float) -> torch.Tensor:
    """mean_i |τ − 1(u_i < 0)| · u_i², u = target − prediction: the expectile regression loss of IQL
    (Kostrikov et al. 2022, eq. 5). τ = 0.5 is half the squared error; τ → 1 fits an upper envelope.

    Args:
        predictions, targets: [N].
    """
    if not 0.0 < expectile < 1.0:
        raise ValueError(f"expectile must be in (0, 1), got {expectile}")
    u = targets - predictions
    return (torch.where(u < 0, 1.0 - expectile, expectile) * u**2).mean()


def fit_expectile_value(features: torch.Tensor, targets: torch.Tensor, *, expectile: float, l2: float = 1e-3,
                        iterations: int = 100) -> torch.Tensor:
    """A linear value V(x) = [f(x), 1]·w fitted to minimise ``expectile_loss`` (+ l2·‖w‖², bias
    unpenalised) by iteratively reweighted least squares: each pass solves the weighted ridge
    problem with the weights |τ − 1(u < 0)| of the previous residuals, until the signs of the
    residuals stop changing (the loss is convex; a fixed point of these passes is its minimum).

    Args:
        features: [N, D] prompt features f(x_i) of each response's prompt.
        targets: [N] the values to fit (the weighted auxiliary reward R_i).
        expectile: τ in (0, 1).
        l2: ridge strength on the feature weights (features are standardised inside).

    Returns:
        [N] V(x_i), the fitted value of each row.
    """
    if not 0.0 < expectile < 1.0:
        raise ValueError(f"expectile must be in (0, 1), got {expectile}")
    x = features.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-8)
    x = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    y = targets.double()
    ridge = torch.full((x.shape[1],), max(l2, 1e-9) * len(x), dtype=x.dtype)  # a constant feature stays solvable
    ridge[-1] = 0.0
    weights = torch.full_like(y, 0.5)
    negative = None
    for _ in range(iterations):
        xw = x * weights[:, None]
        w = torch.linalg.solve(x.T @ xw + torch.diag(ridge), xw.T @ y)
        residual = y - x @ w
        signs = residual < 0
        if negative is not None and torch.equal(signs, negative):
            break
        negative = signs
        weights = torch.where(signs, 1.0 - expectile, expectile).to(x.dtype)
    return (x @ w).to(targets.dtype)


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """1 − Var(target − prediction) / Var(target): 1 is a perfect fit, 0 no better than the mean."""
    var = targets.double().var(unbiased=False)
    return float(1.0 - (targets - predictions).double().var(unbiased=False) / var) if var > 0 else float("nan")


def awr_weights(advantages: torch.Tensor, *, temperature: float, max_weight: float,
                skip_ties: bool = False, tol: float = 1e-9) -> torch.Tensor:
    """w_i = min(exp(A_i / τ), w_max) (advantage-weighted regression, clipped for stability).

    Args:
        advantages: [N].
        temperature: τ > 0; smaller τ concentrates the weight on the best responses.
        max_weight: w_max ≥ 1.
        skip_ties: give weight 0 instead of 1 where |A_i| ≤ tol: a response no better or worse than
            its baseline (both sides of a pair that ties on the auxiliary reward, under the group
            mean) then adds no likelihood term, which would otherwise raise the rejected side of
            such a pair as much as the chosen one.

    Returns:
        [N] non-negative weights; uniform advantages (all 0) give w = 1 (0 with ``skip_ties``).
    """
    if temperature <= 0 or max_weight < 1:
        raise ValueError(f"need temperature > 0 and max_weight >= 1, got {temperature}, {max_weight}")
    w = torch.exp(torch.clamp(advantages / temperature, max=torch.log(torch.tensor(float(max_weight))).item()))
    return torch.where(advantages.abs() <= tol, torch.zeros_like(w), w) if skip_ties else w


def auxiliary_loss(logps: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L_aux = − mean_i [ w_i · log π_θ(y_i|x_i) / |y_i| ].

    Args:
        logps: [N] summed log-probs of each response under the policy (carry gradients).
        lengths: [N] response lengths in tokens (≥ 1).
        weights: [N] AWR weights (constants).

    Returns:
        scalar loss.
    """
    return -(weights.detach() * logps / lengths.clamp(min=1).to(logps.dtype)).mean()


def upo_objective(pref_loss: torch.Tensor, aux_loss: torch.Tensor, *, coef: float) -> torch.Tensor:
    """L = L_pref + λ · L_aux; λ = 0 gives the preference loss exactly (not merely approximately)."""
    return pref_loss if coef == 0 else pref_loss + coef * aux_loss
