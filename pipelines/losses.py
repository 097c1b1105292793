"""Loss callables handed to ``PolicyTrainer.train_step``: they run the model and apply pure math.

Each is a small frozen dataclass (picklable, so it travels to the trainer actors) with
``__call__(model, microbatch) -> (loss, metrics)``: the loss is a mean over the micro-batch. The
trainer weights micro-batches, which may differ in size (``trainer.tokens_per_microbatch``), by
``weight(microbatch)``: its rows by default (losses that average over sequences), its loss tokens
for the token means (``TokenMean``), so a step's loss is the same mean over the rank's batch however
it is cut into micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from actors.modeling import (
    next_token_logps,
    pair_scores,
    preference_logps,
    sequence_logps,
    token_logprobs,
    token_values,
)
from pipelines.algorithms.dpo import chosen_nll, dpo_loss, orpo_loss, preference_metrics, simpo_loss
from pipelines.algorithms.kto import kto_loss
from pipelines.algorithms.ppo import kl_estimate, masked_mean, policy_loss, truncated_is_weights, value_loss
from pipelines.algorithms.reward_model import bradley_terry_loss, reward_centering_penalty, reward_metrics
from pipelines.algorithms.sft import masked_nll, token_accuracy
from pipelines.algorithms.upo import auxiliary_loss, upo_objective
from pipelines.data.batches import KTOBatch, PPOBatch, PreferenceBatch, SFTBatch


class TokenMean:
    """A loss that averages over the batch's loss tokens: micro-batches weigh by their token counts."""

    @staticmethod
    def weight(batch: PPOBatch | SFTBatch) -> float:
        mask = batch.action_mask if isinstance(batch, PPOBatch) else batch.loss_mask[:, 1:]
        return float(mask.sum())


@dataclass(frozen=True)
class DPOLoss:
    """DPO-family loss (``pipelines.algorithms.dpo``) plus an optional RPO NLL term on chosen.

    ``loss_type`` simpo and orpo are reference-free (``simpo_loss``, ``orpo_loss``; ``gamma`` and
    ``lam`` are their γ and λ): they read no reference log-probs. ORPO's "rewards" are the mean
    token log-probs a = p/|y| its odds are built from (β-free; its accuracy is that of log_odds > 0).
    """

    beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    gamma: float = 0.0
    lam: float = 0.1

    @property
    def reference_free(self) -> bool:
        return self.loss_type in ("simpo", "orpo")

    def __call__(self, model: Any, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.terms(*preference_logps(model, batch), batch)

    def terms(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
              batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and metrics given the policy's summed log-probs of both sides, each (B,)."""
        if not self.reference_free and (batch.ref_chosen_logps is None or batch.ref_rejected_logps is None):
            raise ValueError(f"DPOLoss ({self.loss_type}) needs reference log-probs in the batch")
        loss, metrics, _, _ = self.from_logps(policy_chosen, policy_rejected, batch.ref_chosen_logps,
                                              batch.ref_rejected_logps, batch.chosen_lengths(),
                                              batch.rejected_lengths())
        return loss, metrics

    def from_logps(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
                   ref_rejected: torch.Tensor | None, chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The loss (mean over pairs), its metrics and the implicit rewards of both sides (each (B,))
        from summed log-probs and completion lengths, each (B,): what training and held-out evaluation
        both compute. The reference log-probs are None for the reference-free types."""
        extra: dict[str, torch.Tensor] = {}
        if self.loss_type == "simpo":
            losses, chosen_rewards, rejected_rewards = simpo_loss(
                policy_chosen, policy_rejected, beta=self.beta, gamma=self.gamma, chosen_lengths=chosen_lengths,
                rejected_lengths=rejected_lengths, label_smoothing=self.label_smoothing)
        elif self.loss_type == "orpo":
            losses, log_odds = orpo_loss(policy_chosen, policy_rejected, lam=self.lam, chosen_lengths=chosen_lengths,
                                         rejected_lengths=rejected_lengths)
            chosen_rewards = (policy_chosen / chosen_lengths).detach()
            rejected_rewards = (policy_rejected / rejected_lengths).detach()
            extra["orpo/log_odds"] = log_odds.mean()
        else:
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
            )
        loss = losses.mean()
        metrics = preference_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected) | extra
        if self.rpo_alpha:
            nll = chosen_nll(policy_chosen, chosen_lengths).mean()
            metrics["loss/nll"] = nll.detach()
            loss = loss + self.rpo_alpha * nll
        metrics["loss"] = loss.detach()
        return loss, metrics, chosen_rewards, rejected_rewards


@dataclass(frozen=True)
class UPOLoss:
    """UPO (``pipelines.algorithms.upo``): L = L_pref + λ·L_aux, the DPO-family loss plus the
    advantage-weighted likelihood of every response in the batch, chosen and rejected alike (or of
    the chosen ones only: ``preferred_only``), with the weights precomputed from a designer's
    auxiliary rewards. One forward pass serves both terms.

    Metrics: ``loss/pref``, ``loss/aux``, ``aux/<name>_mean`` (the batch's responses),
    ``aux/weight_mean`` and ``aux/weight_max`` (per micro-batch, averaged over micro-batches and ranks).
    """

    preference: DPOLoss
    coef: float
    names: tuple[str, ...]
    preferred_only: bool = False  # the auxiliary likelihood of the chosen responses only (upo.responses: preferred)

    def __call__(self, model: Any, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = batch
        given = (b.aux_chosen_weights, b.aux_rejected_weights, b.aux_chosen_rewards, b.aux_rejected_rewards)
        if any(t is None for t in given):
            raise ValueError("UPOLoss needs auxiliary rewards and weights in the batch")
        chosen, rejected = preference_logps(model, b)
        pref, metrics = self.preference.terms(chosen, rejected, b)
        weights = torch.cat([b.aux_chosen_weights, b.aux_rejected_weights])
        if self.preferred_only:
            aux = auxiliary_loss(chosen, b.chosen_lengths(), b.aux_chosen_weights)
        else:
            aux = auxiliary_loss(torch.cat([chosen, rejected]), torch.cat([b.chosen_lengths(), b.rejected_lengths()]),
                                 weights)
        loss = upo_objective(pref, aux, coef=self.coef)
        rewards = torch.cat([b.aux_chosen_rewards, b.aux_rejected_rewards]).float().mean(0)
        metrics |= {f"aux/{name}_mean": rewards[k] for k, name in enumerate(self.names)}
        metrics |= {"aux/weight_mean": weights.mean(), "aux/weight_max": weights.max(), "loss/pref": pref.detach(),
                    "loss/aux": aux.detach(), "loss": loss.detach()}
        return loss, metrics


def ratio_metrics(name: str, values: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """``name`` as the mean of ``values`` over the selected ``rows`` of a step, which a micro-batch
    may lack: its two parts, ``name@num`` = Σ values·rows / B and ``name@den`` = Σ rows / B, whose
    row-weighted means over micro-batches and ranks the driver divides (``training.resolve_ratios``).

    Args:
        values: (B,) per-row values; rows: (B,) 1.0 on the rows the mean covers.
    """
    rows = rows.to(values.dtype)
    return {f"{name}@num": (values * rows).mean().detach(), f"{name}@den": rows.mean().detach()}


@dataclass(frozen=True)
class KTOLoss:
    """KTO (``pipelines.algorithms.kto``) on unpaired examples. The reference point z0 is estimated
    from the micro-batch's mismatched completions (no gradient, as in the KTO paper and TRL):
    z0 = max(0, mean_i [log π(y'_i|x_i) − log π_ref(y'_i|x_i)]). With ``upo_coef`` > 0 and weights in
    the batch, UPO's advantage-weighted likelihood of the completions is added (L = L_KTO + λ·L_aux).

    Metrics: ``loss``, ``kto/kl`` (z0, averaged over micro-batches), ``rewards/desirable`` and
    ``rewards/undesirable`` (the mean β·r of each kind over the step's rows), ``logps/completion``.
    """

    beta: float
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    upo_coef: float = 0.0
    aux_names: tuple[str, ...] = ()
    preferred_only: bool = False  # the auxiliary likelihood of desirable completions only (upo.responses: preferred)

    def __call__(self, model: Any, batch: KTOBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
        with torch.no_grad():
            kl_logps = sequence_logps(model, batch.kl_input_ids, batch.kl_attention_mask, batch.kl_loss_mask)
        kl = (kl_logps - batch.ref_kl_logps).mean().clamp(min=0).detach()
        losses, rewards = kto_loss(logps, batch.ref_logps, batch.desirable, kl, beta=self.beta,
                                   desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight)
        loss = losses.mean()
        good = batch.desirable.float()
        metrics = {"kto/kl": kl, "logps/completion": logps.detach().mean()}
        metrics |= ratio_metrics("rewards/desirable", rewards, good) | ratio_metrics("rewards/undesirable", rewards,
                                                                                    1 - good)
        if self.aux_names:
            if batch.aux_weights is None or batch.aux_rewards is None:
                raise ValueError("KTOLoss with auxiliary rewards needs them and their weights in the batch")
            aux_weights = batch.aux_weights * batch.desirable if self.preferred_only else batch.aux_weights
            aux = auxiliary_loss(logps, batch.lengths(), aux_weights)
            metrics |= {f"aux/{name}_mean": batch.aux_rewards[:, k].float().mean() for k, name in
                        enumerate(self.aux_names)}
            metrics |= {"aux/weight_mean": batch.aux_weights.mean(), "aux/weight_max": batch.aux_weights.max(),
                        "loss/pref": loss.detach(), "loss/aux": aux.detach()}
            loss = upo_objective(loss, aux, coef=self.upo_coef)
        metrics["loss"] = loss.detach()
        return loss, metrics


@dataclass(frozen=True)
class PolicyGradientLoss(TokenMean):
    """PPO's clipped surrogate over the batch's response tokens (``ppo.policy_loss``: clip-higher and
    the loss aggregations of DAPO / Dr. GRPO), with an optional β·KL(π ‖ π_ref) term in the loss
    (GRPO's placement; ``kl_coef = 0`` leaves it out; it is a token mean) and, when the batch carries
    them, the truncated importance weights of stale samples."""

    clip_eps: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    clip_eps_high: float | None = None
    loss_agg: str = "token_mean"
    norm_tokens: int | None = None  # seq_mean_token_sum_norm's constant T (the generation budget)
    is_cap: float | None = None  # a batch without old_logps: truncate the stale samples' importance weights here

    def proximal(self, logps: torch.Tensor, batch: PPOBatch, metrics: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(π_old, importance weights) of the batch: as it carries them, or for a batch without
        ``old_logps`` (the update is the only pass over its samples) the detached log-probs of this
        forward, the train–inference gap against the engine's log-probs and, with ``is_cap``, the
        truncated importance weights of stale samples computed from them."""
        if batch.old_logps is not None:
            return batch.old_logps, batch.is_weights
        old = logps.detach()
        if batch.behaviour_logps is None:
            return old, None
        mask = batch.action_mask
        gap = (old - batch.behaviour_logps).abs() * mask
        metrics["rollout/logprob_gap"] = gap.sum() / mask.sum().clamp(min=1)
        metrics["rollout/logprob_gap_max"] = gap.max() if gap.numel() else torch.zeros(())  # per micro-batch
        if self.is_cap is None:
            return old, None
        weights, stats = truncated_is_weights(old, batch.behaviour_logps, mask, cap=self.is_cap)
        metrics.update(stats)
        return old, weights

    def weight(self, batch: PPOBatch) -> float:
        """Micro-batches weigh by loss tokens for ``token_mean``, by rows for the per-sequence means."""
        return TokenMean.weight(batch) if self.loss_agg == "token_mean" else float(len(batch))

    def __call__(self, model: Any, batch: PPOBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = token_logprobs(model, batch.input_ids, batch.attention_mask)
        mask = batch.action_mask
        extra: dict[str, torch.Tensor] = {}
        old, is_weights = self.proximal(logps, batch, extra)
        loss, metrics = policy_loss(logps, old, batch.advantages, mask, clip_eps=self.clip_eps,
                                    clip_eps_high=self.clip_eps_high, loss_agg=self.loss_agg, dual_clip=self.dual_clip,
                                    is_weights=is_weights, norm_tokens=self.norm_tokens)
        metrics |= extra
        metrics["loss/policy"] = loss.detach()
        if self.kl_coef:
            if batch.ref_logps is None:
                raise ValueError("a KL term in the loss needs reference log-probs in the batch")
            kl = masked_mean(kl_estimate(logps, batch.ref_logps, self.kl_estimator), mask)
            metrics["loss/kl"] = kl.detach()
            loss = loss + self.kl_coef * kl
        metrics["loss"] = loss.detach()
        return loss, metrics


@dataclass(frozen=True)
class CriticLoss(TokenMean):
    """The clipped value loss (``ppo.value_loss``) of a critic's values on the response tokens."""

    clip_eps: float = 0.2

    def __call__(self, model: Any, batch: PPOBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if batch.old_values is None or batch.returns is None:
            raise ValueError("CriticLoss needs old values and returns in the batch")
        values = token_values(model, batch.input_ids, batch.attention_mask)
        mask = batch.action_mask
        loss, metrics = value_loss(values, batch.old_values, batch.returns, mask, clip_eps=self.clip_eps)
        metrics["val/vf_loss"] = metrics["loss/value"] = loss.detach()
        metrics["val/vpred"] = masked_mean(values, mask).detach()
        metrics["val/error"] = masked_mean((values - batch.returns) ** 2, mask).detach()
        return loss, metrics


@dataclass(frozen=True)
class SFTLoss(TokenMean):
    """Causal-LM loss on response tokens only: the token-mean NLL of each micro-batch."""

    def __call__(self, model: Any, batch: SFTBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logits = logits[:, :-1].float()
        targets = batch.input_ids[:, 1:]
        token_logps = next_token_logps(logits, targets)
        mask = batch.loss_mask[:, 1:]
        loss, _ = masked_nll(token_logps, mask)
        hits = logits.argmax(-1) == targets
        return loss, {"loss": loss.detach(), "token_accuracy": token_accuracy(hits, mask).detach()}


@dataclass(frozen=True)
class RewardModelLoss:
    """Bradley–Terry loss with the batch's optional margins, plus c · mean((r_w + r_l)²)."""

    centering_coef: float = 0.0

    def __call__(self, model: Any, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = pair_scores(model, batch)
        loss = bradley_terry_loss(chosen, rejected, batch.margin).mean()
        metrics = reward_metrics(chosen.detach(), rejected.detach())
        if self.centering_coef:
            penalty = reward_centering_penalty(chosen, rejected).mean()
            metrics["loss/centering"] = penalty.detach()
            loss = loss + self.centering_coef * penalty
        metrics["loss"] = loss.detach()
        return loss, metrics


def sft_row_nll(model: Any, batch: SFTBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (summed NLL over response tokens (B,), response token count (B,)), for evaluation."""
    logps = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
    return -logps, batch.loss_mask[:, 1:].sum(-1).float()
