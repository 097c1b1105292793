"""Stage ``offline_dpo``: DPO on a fixed Parquet dataset of preference pairs.

Phases: ``load_data`` (driver: read, check, tokenize) → ``ref_logprobs`` (reference group, once,
cached in the stage directory) → ``update`` × steps (policy-trainer group) with ``eval`` at the
start, every ``eval_every`` steps and at the end → ``save`` (HF checkpoint, atomic).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from actors.modeling import preference_logps
from actors.policy_trainer import PolicyTrainer, TrainerSpec
from actors.reference import ReferenceModel
from orchestrator.errors import TrainingError
from orchestrator.resources import WorkerResources
from pipelines.algorithms.dpo import dpo_loss, preference_metrics
from pipelines.data import (
    PAIR_COLUMNS,
    EpochSampler,
    TokenizedPair,
    collate_pairs,
    load_tokenizer,
    read_string_table,
    tokenize_pairs,
)
from pipelines.losses import DPOLoss

if TYPE_CHECKING:
    from orchestrator.actor_group import ActorGroup
    from orchestrator.context import StageContext
    from orchestrator.stage_config import OfflineDPOStage


@dataclass
class PairSet:
    """Tokenized pairs with their cached reference log-probs, each (N,)."""

    pairs: list[TokenizedPair]
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor

    def batch(self, idx: list[int], pad_id: int):
        return collate_pairs([self.pairs[i] for i in idx], pad_id, self.ref_chosen[idx], self.ref_rejected[idx])


def load_pairs(path: str, tokenizer, max_length: int, cap: int | None = None) -> list[TokenizedPair]:
    rows = read_string_table(path, PAIR_COLUMNS, what="preference pairs")
    if cap is not None:
        rows = {k: v[:cap] for k, v in rows.items()}
    return tokenize_pairs(rows, tokenizer, max_length=max_length, source=path)


def sharded_logps(group: ActorGroup, method, pairs: list[TokenizedPair], pad_id: int):
    """(chosen (N,), rejected (N,)) log-probs, rows split across the group's ranks (padded to divide)."""
    n, world = len(pairs), group.num_workers
    per_rank = -(-n // world)
    padded = pairs + [pairs[-1]] * (per_rank * world - n)
    shards = [collate_pairs(padded[r * per_rank : (r + 1) * per_rank], pad_id) for r in range(world)]
    results = group.shard(method, shards, preference_logps)
    chosen = torch.cat([c for c, _ in results])[:n]
    rejected = torch.cat([r for _, r in results])[:n]
    return chosen, rejected


def reference_logps(cfg: OfflineDPOStage, ctx: StageContext, ref_path: str, sets: dict[str, list[TokenizedPair]],
                    pad_id: int) -> dict[str, PairSet]:
    """Reference log-probs for every pair, computed once by the reference group and cached."""
    cache = ctx.stage_dir / "ref_logps.parquet"
    key = _cache_key(ref_path, sets)
    if cache.exists():
        table = pq.read_table(cache)
        if table.schema.metadata and table.schema.metadata.get(b"key") == key.encode():
            return _split_cached(table, sets)
    rc = cfg.reference_group
    group = ctx.spawn("reference", ReferenceModel, rc.num_workers, WorkerResources(rc.cpus_per_worker, rc.gpus_per_worker),
                      ref_path, precision="fp32" if not rc.gpus_per_worker else cfg.trainer.precision,
                      num_threads=max(1, int(rc.cpus_per_worker)), trust_remote_code=cfg.trainer.trust_remote_code)
    group.broadcast(ReferenceModel.setup)
    out: dict[str, PairSet] = {}
    columns: dict[str, list] = {"set": [], "chosen": [], "rejected": []}
    for name, pairs in sets.items():
        chosen, rejected = sharded_logps(group, ReferenceModel.evaluate, pairs, pad_id)
        out[name] = PairSet(pairs, chosen, rejected)
        columns["set"] += [name] * len(pairs)
        columns["chosen"] += chosen.tolist()
        columns["rejected"] += rejected.tolist()
    ctx.release(group)
    table = pa.table(columns).replace_schema_metadata({"key": key})
    pq.write_table(table, cache)
    return out


def _cache_key(ref_path: str, sets: dict[str, list[TokenizedPair]]) -> str:
    """Reference model + exact token ids: a cached result is reused only for the same inputs."""
    digest = hashlib.sha256(ref_path.encode())
    for name, pairs in sets.items():
        digest.update(name.encode())
        digest.update(repr([(p.prompt, p.chosen, p.rejected) for p in pairs]).encode())
    return digest.hexdigest()


def _split_cached(table: pa.Table, sets: dict[str, list[TokenizedPair]]) -> dict[str, PairSet]:
    names = table.column("set").to_pylist()
    chosen = torch.tensor(table.column("chosen").to_pylist())
    rejected = torch.tensor(table.column("rejected").to_pylist())
    out = {}
    for name, pairs in sets.items():
        idx = [i for i, n in enumerate(names) if n == name]
        out[name] = PairSet(pairs, chosen[idx], rejected[idx])
    return out


def evaluate(trainer: ActorGroup, held_out: PairSet, beta: float, pad_id: int) -> dict[str, float]:
    """Held-out implicit-reward accuracy and ranking accuracy of the current policy."""
    chosen, rejected = sharded_logps(trainer, PolicyTrainer.evaluate, held_out.pairs, pad_id)
    losses, cr, rr = dpo_loss(chosen, rejected, held_out.ref_chosen, held_out.ref_rejected, beta=beta)
    metrics = {f"eval/{k}": float(v) for k, v in preference_metrics(cr, rr, chosen, rejected).items()}
    metrics["eval/loss"] = float(losses.mean())
    return metrics


def run(cfg: OfflineDPOStage, ctx: StageContext) -> dict[str, str]:
    policy_path = ctx.input("policy")
    ref_path = ctx.input("reference") or policy_path
    tokenizer = load_tokenizer(policy_path, trust_remote_code=cfg.trainer.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sets = {"train": load_pairs(ctx.input("data.train"), tokenizer, cfg.data.max_length)}
    eval_path = ctx.input("data.eval")
    if eval_path:
        sets["eval"] = load_pairs(eval_path, tokenizer, cfg.data.max_length, cfg.data.eval_pairs)
    sampler = EpochSampler(len(sets["train"]), cfg.schedule.pairs_per_step, cfg.schedule.seed)
    data = reference_logps(cfg, ctx, ref_path, sets, pad_id)

    trainer = spawn_trainer(cfg, ctx, policy_path)
    loss_fn = DPOLoss(cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.label_smoothing, cfg.dpo.rpo_alpha)
    steps = cfg.schedule.steps
    if "eval" in data:
        ctx.log_metrics(evaluate(trainer, data["eval"], cfg.dpo.beta, pad_id), step=0)
    for step in range(1, steps + 1):
        metrics = train_one_step(trainer, data["train"], sampler.indices(step - 1), loss_fn, pad_id)
        metrics["epoch"] = step / sampler.batches_per_epoch
        if "eval" in data and (step == steps or (cfg.schedule.eval_every and step % cfg.schedule.eval_every == 0)):
            metrics.update(evaluate(trainer, data["eval"], cfg.dpo.beta, pad_id))
        ctx.log_metrics(metrics, step=step)
        ctx.report_progress(step, steps, metrics)
    check_ranks_in_sync(trainer, ctx)
    out_dir = str(ctx.stage_dir / "model")
    trainer.broadcast(PolicyTrainer.save_hf, out_dir)
    return {"model": out_dir}


def check_ranks_in_sync(trainer: ActorGroup, ctx: StageContext) -> None:
    """Data-parallel ranks must hold identical weights; record each rank's digest and fail if not."""
    digests = trainer.broadcast(PolicyTrainer.weights_digest)
    (ctx.stage_dir / "rank_digests.json").write_text(json.dumps(digests, indent=1))
    if len(set(digests)) != 1:
        raise TrainingError(f"data-parallel ranks diverged: weight digests {digests}")


def spawn_trainer(cfg: OfflineDPOStage, ctx: StageContext, policy_path: str) -> ActorGroup:
    t, o, s = cfg.trainer, cfg.optim, cfg.schedule
    spec = TrainerSpec(
        model_path=policy_path, total_steps=s.steps, examples_per_step=s.pairs_per_step,
        examples_per_microbatch=s.pairs_per_microbatch, lr=o.lr, zero_stage=t.zero_stage, precision=t.precision,
        weight_decay=o.weight_decay, betas=o.betas, eps=o.eps, warmup_steps=o.warmup_steps, schedule=o.schedule,
        min_lr_ratio=o.min_lr_ratio, max_grad_norm=o.max_grad_norm, seed=s.seed,
        num_threads=max(1, int(t.cpus_per_worker)), gradient_checkpointing=t.gradient_checkpointing,
        trust_remote_code=t.trust_remote_code,
    )
    group = ctx.spawn("policy_trainer", PolicyTrainer, t.num_workers, WorkerResources(t.cpus_per_worker, t.gpus_per_worker), spec)
    addr, port = group.rank0(PolicyTrainer.rendezvous_address)
    group.broadcast(PolicyTrainer.setup, addr, port)
    return group


def train_one_step(trainer: ActorGroup, train: PairSet, idx: list[int], loss_fn: DPOLoss, pad_id: int) -> dict[str, float]:
    start = time.perf_counter()
    batch = train.batch(idx, pad_id)
    try:
        per_rank = trainer.shard(PolicyTrainer.train_step, batch.split(trainer.num_workers), loss_fn)
    except FloatingPointError as exc:  # Ray re-raises a rank's error as a subclass of its type
        raise TrainingError(f"offline_dpo: training diverged: {str(exc).splitlines()[-1]}") from None
    elapsed = time.perf_counter() - start
    metrics = {k: sum(r[k] for r in per_rank) / len(per_rank) for k in per_rank[0] if k not in ("num_tokens", "compute_s")}
    metrics["throughput/pairs_per_s"] = len(idx) / elapsed
    metrics["throughput/tokens_per_s"] = sum(r["num_tokens"] for r in per_rank) / elapsed
    metrics["timing/update_s"] = elapsed
    # Time inside the slowest rank's train_step; update_s minus this is collation + Ray dispatch.
    metrics["timing/trainer_compute_s"] = max(r["compute_s"] for r in per_rank)
    return metrics
