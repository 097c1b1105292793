"""``kind: onpolicy_dpo``: DPO on the policy's own samples, chosen and rejected by a reward.

Each iteration is five named, timed phases (``timing/<phase>_s``) over actors that live for the
whole stage: ``rollout`` (the vLLM workers sample K responses per prompt with the current policy)
→ ``score`` (the reward role) → ``select_pairs`` (``pipelines.algorithms.pair_selection``) →
``update`` (the same ``train_step`` and DPO loss as offline DPO, ``updates_per_iteration``
optimizer steps over the new pairs) → ``sync_weights`` (bucketed, versioned, verified). Reference
log-probs of every sample come from the reference role (phase ``ref_logprobs``); with
``reference_mode: refresh`` the loss uses the policy's log-probs at the start of the iteration
instead (the reference role still anchors ``kl/policy_ref_mean``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from actors.policy_trainer import PolicyTrainer
from actors.reference import ReferenceModel
from actors.reward import RewardWorker
from actors.rollout import RolloutSample, RolloutWorker, SamplingSpec
from orchestrator.errors import DataError
from orchestrator.rollout_ops import gap_metrics, generate, score
from orchestrator.weight_sync import WeightSync, response_logprobs
from pipelines.algorithms.pair_selection import select_pairs
from pipelines.data import EpochSampler, TokenizedPair, read_string_table
from pipelines.losses import DPOLoss
from pipelines.stages.offline_dpo import PairSet, policy_inputs
from pipelines.stages.training import spawn_trainer, train_one_step

if TYPE_CHECKING:
    from orchestrator.actor_group import ActorGroup
    from orchestrator.context import StageContext
    from orchestrator.stage_config import OnPolicyDPOStage


@dataclass
class Prompts:
    texts: list[str]
    ids: list[list[int]]


def load_prompts(path: str, tokenizer: Any, column: str, max_length: int, cap: int | None = None) -> Prompts:
    texts = read_string_table(path, (column,), what="prompts")[column][:cap]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    for row, row_ids in enumerate(ids):
        if len(row_ids) > max_length:
            raise DataError(f"{path}: row {row}: prompt is {len(row_ids)} tokens, more than "
                            f"data.max_prompt_length = {max_length}")
    return Prompts(texts, ids)


@dataclass
class Scored:
    """One iteration's samples (K per prompt, grouped by prompt) with rewards and log-probs."""

    prompt_texts: list[str]
    samples: list[RolloutSample]
    rewards: list[float]
    ref_logps: list[list[float]]  # per token, reference role

    def per_prompt(self, k: int) -> list[range]:
        return [range(i, i + k) for i in range(0, len(self.samples), k)]


def spawn_roles(cfg: OnPolicyDPOStage, ctx: StageContext, policy_path: str, ref_path: str
                ) -> tuple[ActorGroup, ActorGroup, ActorGroup]:
    """Rollout, reference and reward groups, all set up before the first iteration."""
    r = cfg.rollout
    rollout = ctx.spawn("rollout", RolloutWorker, policy_path, max_model_len=r.max_model_len,
                        dtype=r.dtype if r.gpus_per_worker or r.dtype != "auto" else "float32",
                        kv_cache_gib=r.kv_cache_gib, tensor_parallel_size=r.tensor_parallel_size,
                        gpu_memory_utilization=r.gpu_memory_utilization, seed=cfg.schedule.seed,
                        num_threads=max(1, int(r.cpus_per_worker)), trust_remote_code=cfg.trainer.trust_remote_code)
    rc = cfg.reference_group
    reference = ctx.spawn("reference", ReferenceModel, ref_path,
                          precision="fp32" if not rc.gpus_per_worker else cfg.trainer.precision,
                          num_threads=max(1, int(rc.cpus_per_worker)), trust_remote_code=cfg.trainer.trust_remote_code)
    rw = cfg.reward_group
    reward = ctx.spawn("reward", RewardWorker, function=cfg.reward.function, model_path=ctx.input("reward.model"),
                       normalize=cfg.reward.normalize, precision="fp32" if not rw.gpus_per_worker else "auto",
                       num_threads=max(1, int(rw.cpus_per_worker)), trust_remote_code=cfg.trainer.trust_remote_code)
    for group, setup in ((rollout, RolloutWorker.setup), (reference, ReferenceModel.setup),
                         (reward, RewardWorker.setup)):
        group.broadcast(setup)
    return rollout, reference, reward


def rollout_metrics(scored: Scored, k: int) -> dict[str, float]:
    samples, rewards = scored.samples, scored.rewards
    best = [max(rewards[i] for i in idx) for idx in scored.per_prompt(k)]
    return {
        "rollout/reward_mean": sum(rewards) / len(rewards),
        "rollout/reward_max": max(rewards),
        "rollout/reward_best_of_k_mean": sum(best) / len(best),
        "rollout/response_length_mean": sum(len(s.response_ids) for s in samples) / len(samples),
        "rollout/truncated_rate": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "rollout/samples": float(len(samples)),
    }


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
    return PairSet(pairs, torch.tensor(ref_c), torch.tensor(ref_r)), rows, metrics


def update(cfg: OnPolicyDPOStage, trainer: ActorGroup, pair_set: PairSet, loss_fn: DPOLoss, rng: random.Random,
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


def evaluate(cfg: OnPolicyDPOStage, rollout: ActorGroup, reward: ActorGroup, held_out: Prompts) -> dict[str, float]:
    """Greedy decoding of the held-out prompts by the rollout workers (the served policy), scored by
    the stage reward and, when configured, the checker (``eval/exact_match`` = share scored ≥ 1)."""
    from pipelines.rewards import FunctionReward

    greedy = SamplingSpec(max_new_tokens=cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens, temperature=0.0)
    samples = generate(rollout, held_out.ids, greedy, cfg.rollout.prompts_per_chunk)
    responses = [s.text for s in samples]
    rewards = score(reward, held_out.texts, responses, cfg.reward_group.items_per_chunk)
    metrics = {"eval/reward_mean": sum(rewards) / len(rewards),
               "eval/response_length_mean": sum(len(s.response_ids) for s in samples) / len(samples)}
    if cfg.eval.checker:
        checks = FunctionReward(cfg.eval.checker).score(held_out.texts, responses)
        metrics["eval/exact_match"] = sum(c >= 1.0 for c in checks) / len(checks)
    return metrics


def run(cfg: OnPolicyDPOStage, ctx: StageContext) -> dict[str, str]:
    policy_path, ref_path, tokenizer, pad_id = policy_inputs(cfg, ctx)
    d, s, k = cfg.data, cfg.schedule, cfg.sampling.samples_per_prompt
    prompts = load_prompts(ctx.input("data.train"), tokenizer, d.column, d.max_prompt_length)
    eval_path = ctx.input("data.eval")
    held_out = load_prompts(eval_path, tokenizer, d.column, d.max_prompt_length, d.eval_prompts) if eval_path else None

    rollout, reference, reward = spawn_roles(cfg, ctx, policy_path, ref_path)
    trainer = spawn_trainer(ctx, role="policy_trainer", model_path=policy_path, trainer=cfg.trainer, optim=cfg.optim,
                            steps=s.iterations * s.updates_per_iteration, per_step=s.pairs_per_update,
                            per_microbatch=s.pairs_per_microbatch, seed=s.seed)
    ws = cfg.rollout.weight_sync
    sync = WeightSync(trainer, rollout, pad_id, bucket_bytes=int(ws.bucket_mib * 2**20), tolerance=ws.tolerance,
                      transport=ws.transport)
    loss_fn = DPOLoss(cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.label_smoothing, cfg.dpo.rpo_alpha)
    sampler = EpochSampler(len(prompts.ids), min(s.prompts_per_iteration, len(prompts.ids)), s.seed)
    rng = random.Random(s.seed)
    pairs_dir = ctx.stage_dir / "pairs"
    pairs_dir.mkdir(parents=True, exist_ok=True)
    all_rows: list[dict[str, Any]] = []
    if held_out is not None:
        ctx.log_metrics(evaluate(cfg, rollout, reward, held_out), step=0)

    for it in range(1, s.iterations + 1):
        m: dict[str, float] = {}
        chosen = sampler.indices(it - 1)
        sampling = SamplingSpec(max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
                                top_p=cfg.sampling.top_p, n=k, seed=s.seed * 100_003 + it)
        with ctx.timed("rollout", m):
            samples = generate(rollout, [prompts.ids[i] for i in chosen], sampling, cfg.rollout.prompts_per_chunk)
        texts = [prompts.texts[i] for i in chosen for _ in range(k)]
        with ctx.timed("score", m):
            rewards = score(reward, texts, [x.text for x in samples], cfg.reward_group.items_per_chunk)
        seqs = [(x.prompt_ids, x.response_ids) for x in samples]
        with ctx.timed("ref_logprobs", m):
            ref_lp = response_logprobs(reference, ReferenceModel.evaluate, seqs, pad_id)
        with ctx.timed("policy_logprobs", m):  # the trainer's view of the sampled tokens: gap and refresh-reference
            policy_lp = response_logprobs(trainer, PolicyTrainer.evaluate, seqs, pad_id)
        scored = Scored(texts, samples, rewards, ref_lp)
        m.update(rollout_metrics(scored, k))
        m["kl/policy_ref_mean"] = sequence_kl(scored)
        m.update(gap_metrics(samples, policy_lp))
        with ctx.timed("select_pairs", m):
            loss_ref = ref_lp if cfg.reference_mode == "fixed" else policy_lp
            pair_set, rows, pair_metrics = pair_up(cfg, scored, loss_ref, rng)
        m.update(pair_metrics)
        for row in rows:
            row["iteration"] = it
        all_rows += rows
        audit = pairs_dir / f"iter_{it:04d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({"prompt": pa.array([], pa.string())}), audit)
        ctx.tracker.log_artifact(audit, artifact_path="pairs")
        if pair_set.pairs:
            with ctx.timed("update", m):
                m.update(update(cfg, trainer, pair_set, loss_fn, rng, pad_id))
            with ctx.timed("sync_weights", m):
                m.update(sync.push())
                if ws.verify_every and sync.version % ws.verify_every == 0:
                    m.update(sync.verify(seqs[: min(8, len(seqs))]))
        m["policy_version"] = float(sync.version)
        if cfg.eval.table_rows:
            shown = list(range(min(cfg.eval.table_rows, len(samples))))
            ctx.tracker.log_table({"iteration": [it] * len(shown), "prompt": [texts[i] for i in shown],
                                   "response": [samples[i].text for i in shown],
                                   "reward": [rewards[i] for i in shown],
                                   "policy_version": [samples[i].policy_version for i in shown]},
                                  artifact_file=f"samples/iter_{it:04d}.json")
        if held_out is not None and (it == s.iterations or (s.eval_every and it % s.eval_every == 0)):
            m.update(evaluate(cfg, rollout, reward, held_out))
        ctx.log_metrics(m, step=it)
        ctx.report_progress(it, s.iterations, m)

    out_dir = str(ctx.stage_dir / "model")
    trainer.broadcast(PolicyTrainer.save_hf, out_dir)
    pairs_path = ctx.stage_dir / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(all_rows) if all_rows else pa.table({"prompt": pa.array([], pa.string())}),
                   pairs_path)
    return {"model": out_dir, "pairs": str(pairs_path)}
