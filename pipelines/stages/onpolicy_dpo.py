"""``kind: onpolicy_dpo``: DPO on the policy's own samples, chosen and rejected by a reward.

Each iteration is five named, timed phases (``timing/<phase>_s``) over actors that live for the
whole stage: ``rollout`` (the vLLM workers sample K responses per prompt with the current policy)
→ ``score`` (the reward role) → ``select_pairs`` (``pipelines.algorithms.pair_selection``) →
``update`` (the same ``train_step`` and DPO loss as offline DPO, ``updates_per_iteration``
optimizer steps over the new pairs) → ``sync_weights`` (bucketed, versioned, verified). Reference
log-probs of every sample come from the reference role (phase ``ref_logprobs``); with
``reference_mode: refresh`` the loss uses the policy's log-probs at the start of the iteration
instead (the reference role still anchors ``objective/kl``). The reference-free ``dpo.loss_type``
simpo and orpo start no reference role: no ``ref_logprobs`` phase and no ``objective/kl``.

With ``auxiliary`` rewards (UPO) the reward role scores every sample under them too, the weights
use the mean over each prompt's K samples as the baseline, the loss is ``UPOLoss``, and the audit
Parquet (``pairs`` output) records each side's auxiliary scores and weight.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field, model_validator

from pipelines.algorithms.evaluation import sampled_kl
from pipelines.algorithms.pair_selection import select_pairs
from pipelines.data.tokens import TokenizedPair
from pipelines.stages.auxiliary import AuxiliaryObjective, AuxiliaryTerm, UPOFields
from pipelines.stages.base import Frozen, Metric, StageKind, check_batches, trainer_numbers
from pipelines.stages.config import DPOFields
from pipelines.stages.online import OnlineSchedule, OnlineStage, Scored
from pipelines.stages.online_loop import run_online
from pipelines.stages.pairs import PairSet, training_loss
from pipelines.stages.training import mean_over_steps, train_one_step

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import ActorGroup
    from orchestrator.runtime.context import StageContext


class PairSelectionConfig(Frozen):
    """Which sampled responses become (chosen, rejected) pairs; see pipelines.algorithms.pair_selection."""

    method: Literal["max_min", "max_random", "rso"] = "max_min"
    rso_beta: float = Field(0.5, gt=0, description="β of statistical rejection sampling (not DPO's β)")
    rso_samples: int = Field(2, ge=2, description="k: samples RSO accepts per prompt, paired consecutively")


class OnPolicyScheduleConfig(OnlineSchedule):
    """Iterations of rollout → score → select → update → sync."""

    updates_per_iteration: int = Field(1, ge=1, description="optimizer steps over each iteration's new pairs")
    pairs_per_update: int = Field(32, ge=1, description="global batch of one optimizer step (drawn from the new pairs)")
    pairs_per_microbatch: int = Field(16, ge=1)
    max_pair_passes: float | None = Field(
        None, gt=0, description="cap on passes over each iteration's pairs: fewer than updates_per_iteration "
        "steps when the pairs run short (the last step topped up from the start of the pass); "
        "None: updates_per_iteration steps always, drawing pairs again when they run short")


class OnPolicyDPOStage(DPOFields, UPOFields, OnlineStage):
    """On-policy DPO with rejection sampling: the policy's own samples, scored and paired each iteration."""

    kind: Literal["onpolicy_dpo"]
    reference_mode: Literal["fixed", "refresh"] = Field(
        "fixed", description="fixed: the reference model throughout; refresh: the policy at the start of each iteration"
    )
    selection: PairSelectionConfig = PairSelectionConfig()
    schedule: OnPolicyScheduleConfig = OnPolicyScheduleConfig()

    ROLES: ClassVar[tuple[str, ...]] = ("policy_trainer", "reference", "reward", "rollout", "environment")
    PHASES: ClassVar[tuple[tuple[str, ...], ...]] = (ROLES,)
    OUTPUTS: ClassVar[dict[str, str]] = {"model": "model", "pairs": "pairs"}
    HEADLINE: ClassVar[tuple[Metric, ...]] = (*OnlineStage.HEADLINE[:3], Metric("rewards/accuracies", "acc"),
                                               *OnlineStage.HEADLINE[3:])

    def headline(self) -> tuple[Metric, ...]:
        return self.HEADLINE + tuple(Metric(f"eval/aux/{a.name}_mean", a.name) for a in self.auxiliary)

    def numbers(self) -> dict[str, float | str]:
        s, t = self.schedule, self.trainer
        numbers = trainer_numbers("pairs", s.pairs_per_update, s.pairs_per_microbatch,
                                  s.iterations * s.updates_per_iteration, t.num_workers, t.zero_stage, 2)
        return numbers | self.online_numbers()

    @model_validator(mode="after")
    def _consistent(self) -> OnPolicyDPOStage:
        s = self.schedule
        check_batches(s.pairs_per_update, s.pairs_per_microbatch, self.trainer.num_workers, "pairs", "pairs_per_update")
        if self.selection.method == "rso" and self.selection.rso_samples > self.sampling.samples_per_prompt:
            raise ValueError(f"selection.rso_samples: {self.selection.rso_samples} accepted of "
                             f"{self.sampling.samples_per_prompt} samples per prompt is impossible")
        if self.upo is not None and self.upo.baseline == "value":
            raise ValueError("upo.baseline: value is fitted once on an offline stage's data; on-policy samples come in "
                             "groups of samples_per_prompt, whose mean (group_mean) is the baseline here")
        if self.reference_free and self.reference_mode != "fixed":
            raise ValueError(f"reference_mode: {self.reference_free_reason()} uses no reference model; "
                             "drop reference_mode")
        return self


def sequence_kl(scored: Scored) -> float:
    """``objective/kl``: the sampled KL(π ‖ π_ref) per sequence, its mean over the samples
    (``algorithms.evaluation.sampled_kl``; π's log-probs are the engine's, verified against the
    trainer's by the sync check)."""
    assert scored.ref_logps is not None
    policy = [[masked_sum(s.logprobs, s.loss_mask)] for s in scored.samples]
    ref = [[masked_sum(r, s.loss_mask)] for r, s in zip(scored.ref_logps, scored.samples, strict=True)]
    return float(sampled_kl(policy, ref).mean())


def masked_sum(values: list[float], mask: list[int] | None) -> float:
    """Σ of per-token values, over the tokens ``mask`` marks (all of them without one)."""
    return sum(values) if mask is None else sum(v for v, m in zip(values, mask, strict=True) if m)


def pair_up(cfg: OnPolicyDPOStage, scored: Scored, loss_ref: list[list[float]] | None, rng: random.Random
            ) -> tuple[PairSet, list[dict[str, Any]], dict[str, float]]:
    """Select pairs per prompt; returns them with their reference log-prob sums, rows for the
    Parquet audit file, and the pairs/ and rso/ metrics. ``loss_ref`` is None for a reference-free loss."""
    sel, k = cfg.selection, cfg.sampling.samples_per_prompt
    pairs: list[TokenizedPair] = []
    ref_c: list[float] = []
    ref_r: list[float] = []
    sides: list[tuple[int, int]] = []  # (chosen, rejected) sample index of each pair
    rows: list[dict[str, Any]] = []
    dropped = accepted = 0
    margins: list[float] = []
    for p, idx in enumerate(scored.per_prompt(k)):
        rewards = [scored.rewards[i] for i in idx]
        chosen_rejected, n_accepted = select_pairs(rewards, sel.method, rng, rso_k=sel.rso_samples,
                                                   rso_beta=sel.rso_beta)
        accepted += n_accepted
        if not chosen_rejected:
            dropped += 1
        for c, r in chosen_rejected:
            sc, sr = scored.samples[idx[c]], scored.samples[idx[r]]
            pairs.append(TokenizedPair(sc.prompt_ids, sc.response_ids, sr.response_ids, chosen_mask=sc.loss_mask,
                                       rejected_mask=sr.loss_mask))
            if loss_ref is not None:  # over the tokens the policy sampled (a trajectory's mask)
                ref_c.append(masked_sum(loss_ref[idx[c]], sc.loss_mask))
                ref_r.append(masked_sum(loss_ref[idx[r]], sr.loss_mask))
            margins.append(rewards[c] - rewards[r])
            sides.append((idx[c], idx[r]))
            rows.append({"prompt": scored.prompt_texts[idx[c]], "chosen": sc.text, "rejected": sr.text,
                         "chosen_reward": rewards[c], "rejected_reward": rewards[r]})
    n_prompts = len(scored.samples) // k
    metrics = {
        "pairs/count": float(len(pairs)),
        "pairs/dropped_ties": float(dropped),
        "pairs/reward_margin_mean": sum(margins) / len(margins) if margins else 0.0,
    }
    if sel.method == "rso":
        metrics["rso/acceptance_rate"] = accepted / (n_prompts * k)
    objective = cfg.auxiliary_objective()
    aux = auxiliary_term(objective, k, scored, sides, rows) if scored.aux is not None and objective else None
    refs = (None, None) if loss_ref is None else (torch.tensor(ref_c), torch.tensor(ref_r))
    return PairSet(pairs, *refs, aux), rows, metrics


def auxiliary_term(objective: AuxiliaryObjective, k: int, scored: Scored, sides: list[tuple[int, int]],
                   rows: list[dict[str, Any]]) -> AuxiliaryTerm:
    """UPO: AWR weights of all samples, with the mean over the K samples of each prompt as the
    baseline, taken for both sides of each pair; the audit rows get each side's scores and weight."""
    assert scored.aux is not None
    w = objective.weights(scored.aux, torch.arange(len(scored.samples)) // k)
    c = torch.tensor([i for i, _ in sides], dtype=torch.long)
    r = torch.tensor([j for _, j in sides], dtype=torch.long)
    term = AuxiliaryTerm(objective.names, scored.aux[c].float(), scored.aux[r].float(), w[c], w[r])
    for p, row in enumerate(rows):
        for n, name in enumerate(term.names):
            row[f"chosen_{name}"] = float(term.chosen_rewards[p, n])
            row[f"rejected_{name}"] = float(term.rejected_rewards[p, n])
        row["chosen_weight"], row["rejected_weight"] = float(term.chosen_weights[p]), float(term.rejected_weights[p])
    return term


def earlier_pairs(pairs_dir: Path, done: int) -> list[dict[str, Any]]:
    """The audit rows of iterations 1..``done`` (a resumed stage); later files, written after the last
    checkpoint, are removed (those iterations run again)."""
    rows: list[dict[str, Any]] = []
    for path in sorted(pairs_dir.glob("iter_*.parquet")):
        if int(path.stem.removeprefix("iter_")) <= done:
            rows += [r for r in pq.read_table(path).to_pylist() if "iteration" in r]
        else:
            path.unlink()
    return rows


def update_steps(num_pairs: int, pairs_per_update: int, updates_per_iteration: int,
                 max_pair_passes: float | None) -> int:
    """Optimizer steps an iteration takes over ``num_pairs`` new pairs: ``updates_per_iteration``,
    or fewer where that would draw them more than ``max_pair_passes`` times (at least one step)."""
    if max_pair_passes is None:
        return updates_per_iteration
    return max(1, min(updates_per_iteration, math.ceil(max_pair_passes * num_pairs / pairs_per_update)))


def update(cfg: OnPolicyDPOStage, trainer: ActorGroup, pair_set: PairSet, loss_fn: Any, rng: random.Random,
           pad_id: int) -> dict[str, float]:
    """``update_steps`` optimizer steps, each on ``pairs_per_update`` pairs drawn from this
    iteration's pairs: one shuffled pass, wrapping around when there are fewer pairs than needed.
    Metrics are averaged over the steps; ``pairs/updates`` counts them and ``pairs/passes`` is the
    number of times the average pair was drawn."""
    s = cfg.schedule
    order = list(range(len(pair_set.pairs)))
    rng.shuffle(order)
    steps = update_steps(len(order), s.pairs_per_update, s.updates_per_iteration, s.max_pair_passes)

    def taken() -> Iterator[dict[str, float]]:
        for u in range(steps):
            start = u * s.pairs_per_update
            idx = [order[(start + j) % len(order)] for j in range(s.pairs_per_update)]
            yield train_one_step(trainer, pair_set.batch(idx, pad_id), loss_fn, stage=cfg.name, unit="pairs")

    totals = mean_over_steps(taken(), steps)
    return totals | {"pairs/updates": float(steps), "pairs/passes": steps * s.pairs_per_update / len(order)}


class OnPolicyDPO:
    """The on-policy DPO part of an iteration (``run_online`` does the rest): ``select_pairs`` from
    the scored samples (the Parquet audit of each iteration's pairs), then ``update``."""

    def __init__(self, cfg: OnPolicyDPOStage) -> None:
        self.cfg = cfg
        self.loss_fn = training_loss(cfg.dpo, cfg.auxiliary_objective())
        self.rng = random.Random(cfg.schedule.seed)
        self.rows: list[dict[str, Any]] = []
        self.trainer: ActorGroup | None = None
        self.pad_id = 0
        self.pairs_dir = Path()

    def trainer_steps(self) -> tuple[int, int, int]:
        s = self.cfg.schedule
        return s.iterations * s.updates_per_iteration, s.pairs_per_update, s.pairs_per_microbatch

    def spawn(self, ctx: StageContext, trainer: ActorGroup, policy_path: str, pad_id: int) -> list[ActorGroup]:
        self.trainer, self.pad_id, self.pairs_dir = trainer, pad_id, ctx.stage_dir / "pairs"
        return []

    def restore(self, done: int, state: dict[str, Any]) -> None:
        if done:
            self.rng.setstate((state["rng"][0], tuple(state["rng"][1]), state["rng"][2]))
        else:  # a fresh start, or a rollback to it
            self.rng = random.Random(self.cfg.schedule.seed)
        self.pairs_dir.mkdir(parents=True, exist_ok=True)
        self.rows = earlier_pairs(self.pairs_dir, done)

    def forwards(self) -> dict[str, Any]:
        return {}  # the reference and policy log-probs are all it needs

    def learn(self, ctx: StageContext, iteration: int, scored: Scored, policy_lp: list[list[float]],
              m: dict[str, float]) -> bool:
        cfg = self.cfg
        if scored.ref_logps is not None:  # a reference-free loss starts no reference role
            m["objective/kl"] = sequence_kl(scored)
        with ctx.log.timed("select_pairs", m):
            loss_ref = scored.ref_logps if cfg.reference_mode == "fixed" else policy_lp
            pair_set, rows, pair_metrics = pair_up(cfg, scored, loss_ref, self.rng)
        m.update(pair_metrics)
        for row in rows:
            row["iteration"] = iteration
        self.rows += rows
        audit = self.pairs_dir / f"iter_{iteration:04d}.parquet"
        write_rows(rows, audit)
        ctx.log.artifact(audit, "pairs")
        if not pair_set.pairs:
            return False
        with ctx.log.timed("update", m):
            m.update(update(cfg, self.trainer, pair_set, self.loss_fn, self.rng, self.pad_id))
        return True

    def state(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate()}

    def outputs(self, ctx: StageContext) -> dict[str, str]:
        pairs_path = ctx.stage_dir / "pairs.parquet"
        write_rows(self.rows, pairs_path)
        return {"pairs": str(pairs_path)}


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """Pair rows as Parquet (an empty file keeps a ``prompt`` column)."""
    pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({"prompt": pa.array([], pa.string())}), path)


def run(cfg: OnPolicyDPOStage, ctx: StageContext) -> dict[str, str]:
    return run_online(cfg, ctx, OnPolicyDPO(cfg))


STAGE = StageKind(OnPolicyDPOStage, run)
