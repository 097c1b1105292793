"""``kind: onpolicy_dpo``: DPO on the policy's own samples, chosen and rejected by a reward.

Each iteration is five named, timed phases (``timing/<phase>_s``) over actors that live for the
whole stage: ``rollout`` (the vLLM workers sample K responses per prompt with the current policy)
→ ``score`` (the reward role) → ``select_pairs`` (``pipelines.algorithms.pair_selection``) →
``update`` (the same ``train_step`` and DPO loss as offline DPO, ``updates_per_iteration``
optimizer steps over the new pairs) → ``sync_weights`` (bucketed, versioned, verified). Reference
log-probs of every sample come from the reference role (phase ``ref_logprobs``); with
``reference_mode: refresh`` the loss uses the policy's log-probs at the start of the iteration
instead (the reference role still anchors ``kl/policy_ref_mean``).

With ``auxiliary`` rewards (UPO) the reward role scores every sample under them too, the weights
use the mean over each prompt's K samples as the baseline, the loss is ``UPOLoss``, and the audit
Parquet (``pairs`` output) records each side's auxiliary scores and weight.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from actors.policy_trainer import PolicyTrainer
from pipelines.algorithms.pair_selection import select_pairs
from pipelines.data import EpochSampler, TokenizedPair
from pipelines.losses import DPOLoss, UPOLoss
from pipelines.stages import auxiliary
from pipelines.stages.auxiliary import AuxiliaryTerm
from pipelines.stages.offline_dpo import PairSet, policy_inputs
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
from pipelines.stages.training import spawn_trainer, train_one_step

if TYPE_CHECKING:
    from orchestrator.actor_group import ActorGroup
    from orchestrator.context import StageContext
    from orchestrator.dpo_config import OnPolicyDPOStage


def sequence_kl(scored: Scored) -> float:
    """Mean over samples of Σ_t (log π(y_t) − log π_ref(y_t)) on the sampled tokens: an unbiased
    estimate of KL(π ‖ π_ref) per sequence (π's log-probs are the engine's, verified against the
    trainer's by the sync check)."""
    kls = [sum(a - b for a, b in zip(s.logprobs, ref, strict=True)) for s, ref in zip(scored.samples, scored.ref_logps,
                                                                                  strict=True)]
    return sum(kls) / len(kls)


def pair_up(cfg: OnPolicyDPOStage, scored: Scored, loss_ref: list[list[float]], rng: random.Random
            ) -> tuple[PairSet, list[dict[str, Any]], dict[str, float]]:
    """Select pairs per prompt; returns them with their reference log-prob sums, rows for the
    Parquet audit file, and the pairs/ and rso/ metrics."""
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
            pairs.append(TokenizedPair(sc.prompt_ids, sc.response_ids, sr.response_ids))
            ref_c.append(sum(loss_ref[idx[c]]))
            ref_r.append(sum(loss_ref[idx[r]]))
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
    aux = auxiliary_term(cfg, scored, sides, rows) if scored.aux is not None else None
    return PairSet(pairs, torch.tensor(ref_c), torch.tensor(ref_r), aux), rows, metrics


def auxiliary_term(cfg: OnPolicyDPOStage, scored: Scored, sides: list[tuple[int, int]],
                   rows: list[dict[str, Any]]) -> AuxiliaryTerm:
    """UPO: AWR weights of all samples, with the mean over the K samples of each prompt as the
    baseline, taken for both sides of each pair; the audit rows get each side's scores and weight."""
    assert scored.aux is not None
    k = cfg.sampling.samples_per_prompt
    w = auxiliary.weights(cfg, scored.aux, torch.arange(len(scored.samples)) // k)
    c = torch.tensor([i for i, _ in sides], dtype=torch.long)
    r = torch.tensor([j for _, j in sides], dtype=torch.long)
    term = AuxiliaryTerm(auxiliary.names(cfg), scored.aux[c].float(), scored.aux[r].float(), w[c], w[r])
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


def update(cfg: OnPolicyDPOStage, trainer: ActorGroup, pair_set: PairSet, loss_fn: Any, rng: random.Random,
           pad_id: int) -> dict[str, float]:
    """``updates_per_iteration`` optimizer steps, each on ``pairs_per_update`` pairs drawn from this
    iteration's pairs: one shuffled pass, wrapping around when there are fewer pairs than needed.
    Metrics are averaged over the steps."""
    s = cfg.schedule
    order = list(range(len(pair_set.pairs)))
    rng.shuffle(order)
    totals: dict[str, float] = {}
    for u in range(s.updates_per_iteration):
        start = u * s.pairs_per_update
        idx = [order[(start + j) % len(order)] for j in range(s.pairs_per_update)]
        step = train_one_step(trainer, pair_set.batch(idx, pad_id), loss_fn, stage=cfg.kind, unit="pairs")
        for name, value in step.items():
            totals[name] = totals.get(name, 0.0) + value / s.updates_per_iteration
    totals.pop("timing/update_s", None)  # the phase timer covers all steps
    return totals


def run(cfg: OnPolicyDPOStage, ctx: StageContext) -> dict[str, str]:
    policy_path, ref_path, tokenizer, pad_id = policy_inputs(cfg, ctx)
    s = cfg.schedule
    prompts, held_out = load_prompt_sets(cfg, ctx, tokenizer)

    roles = spawn_roles(cfg, ctx, policy_path, ref_path)
    trainer = spawn_trainer(ctx, role="policy_trainer", model_path=policy_path, trainer=cfg.trainer, optim=cfg.optim,
                            steps=s.iterations * s.updates_per_iteration, per_step=s.pairs_per_update,
                            per_microbatch=s.pairs_per_microbatch, seed=s.seed)
    sync = open_weight_sync(cfg, trainer, roles, pad_id)
    loss_fn: Any = DPOLoss(cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.label_smoothing, cfg.dpo.rpo_alpha)
    if cfg.auxiliary:
        loss_fn = UPOLoss(loss_fn, cfg.upo.coef, auxiliary.names(cfg))
    sampler = EpochSampler(len(prompts.ids), min(s.prompts_per_iteration, len(prompts.ids)), s.seed)
    rng = random.Random(s.seed)
    pairs_dir = ctx.stage_dir / "pairs"
    pairs_dir.mkdir(parents=True, exist_ok=True)
    done, state = resume_online(ctx, [trainer], sync)
    if done:
        rng.setstate((state["rng"][0], tuple(state["rng"][1]), state["rng"][2]))
    all_rows = earlier_pairs(pairs_dir, done)
    if held_out is not None and not done:
        ctx.log_metrics(evaluate(cfg, roles, held_out), step=0)

    for it in range(done + 1, s.iterations + 1):
        m: dict[str, float] = {}
        scored, policy_lp = sample_and_score(cfg, ctx, roles, trainer, prompts, sampler.indices(it - 1), it, pad_id, m)
        m["kl/policy_ref_mean"] = sequence_kl(scored)
        with ctx.timed("select_pairs", m):
            loss_ref = scored.ref_logps if cfg.reference_mode == "fixed" else policy_lp
            pair_set, rows, pair_metrics = pair_up(cfg, scored, loss_ref, rng)
        m.update(pair_metrics)
        for row in rows:
            row["iteration"] = it
        all_rows += rows
        audit = pairs_dir / f"iter_{it:04d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({"prompt": pa.array([], pa.string())}), audit)
        ctx.defer(lambda audit=audit: ctx.tracker.log_artifact(audit, artifact_path="pairs"))
        if pair_set.pairs:
            with ctx.timed("update", m):
                m.update(update(cfg, trainer, pair_set, loss_fn, rng, pad_id))
            sync_and_verify(cfg, ctx, sync, scored, m)
        m["policy_version"] = float(sync.version)
        log_sample_table(ctx, scored, cfg.eval.table_rows, it)
        if held_out is not None and due(it, s.iterations, s.eval_every):
            m.update(evaluate(cfg, roles, held_out))
        ctx.log_metrics(m, step=it)
        ctx.report_progress(it, s.iterations, m)
        if ctx.checkpoint_due(it, s.iterations):
            ctx.save_checkpoint(it, [trainer], {"rng": rng.getstate(), "version": sync.version})

    out_dir = str(ctx.stage_dir / "model")
    trainer.broadcast(PolicyTrainer.save_hf, out_dir)
    pairs_path = ctx.stage_dir / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(all_rows) if all_rows else pa.table({"prompt": pa.array([], pa.string())}),
                   pairs_path)
    return {"model": out_dir, "pairs": str(pairs_path)}
