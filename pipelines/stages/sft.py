"""Stage ``sft``: supervised fine-tuning on responses (prompt tokens masked).

Phases: ``load_data`` (driver: read, check, tokenize) → ``update`` × steps (policy-trainer group)
with ``eval`` (held-out loss + greedy decoding scored by exact match or a checker) at the start,
every ``eval_every`` steps and at the end → ``save`` (HF checkpoint, atomic).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from actors.batches import SFTBatch
from actors.policy_trainer import PolicyTrainer
from orchestrator.sharding import sharded_rows
from pipelines.data import EpochSampler, load_tokenizer, pad_token_id
from pipelines.losses import SFTLoss, sft_row_nll
from pipelines.rewards import FunctionReward
from pipelines.sft_data import SFTExample, collate_sft, read_sft_rows, tokenize_sft
from pipelines.stages.training import spawn_trainer, train_loop

if TYPE_CHECKING:
    from orchestrator.actor_group import ActorGroup
    from orchestrator.context import StageContext
    from orchestrator.stage_config import SFTStage


def load_examples(path: str, cfg: SFTStage, tokenizer: Any, cap: int | None = None) -> list[SFTExample]:
    rows = read_sft_rows(path, cfg.data.format)[:cap]
    return tokenize_sft(rows, tokenizer, max_length=cfg.data.max_length, source=path)


def padding_fraction(batch: SFTBatch) -> dict[str, float]:
    """Share of the batch's positions that are padding (what packing would save)."""
    return {"data/pad_fraction": 1.0 - batch.num_tokens() / batch.input_ids.numel()}


def generate_responses(trainer: ActorGroup, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy responses of the current policy, prompts split across the trainer ranks."""
    shards, _ = sharded_rows(prompts, trainer.num_workers)
    results = trainer.shard(PolicyTrainer.generate, shards, max_new_tokens)
    return [row for shard in results for row in shard][: len(prompts)]


def evaluate(cfg: SFTStage, ctx: StageContext, trainer: ActorGroup, held_out: list[SFTExample], tokenizer: Any,
             checker: FunctionReward | None) -> dict[str, float]:
    """Held-out token-mean NLL and, when enabled, greedy-decoding exact match."""
    pad_id = pad_token_id(tokenizer)
    shards, _ = sharded_rows(held_out, trainer.num_workers)
    results = trainer.shard(PolicyTrainer.evaluate, [collate_sft(s, pad_id) for s in shards], sft_row_nll)
    nll = torch.cat([r[0] for r in results])[: len(held_out)]
    count = torch.cat([r[1] for r in results])[: len(held_out)]
    metrics = {"eval/loss": float(nll.sum() / count.sum())}
    if cfg.generation.enabled:
        metrics.update(score_generations(cfg, ctx, trainer, held_out, tokenizer, checker))
    return metrics


def score_generations(cfg: Any, ctx: StageContext, trainer: ActorGroup, held_out: list[Any],
                      tokenizer: Any, checker: FunctionReward | None,
                      extra: Callable[[list[str], list[str]], tuple[dict[str, list[float]], dict[str, float]]]
                      | None = None) -> dict[str, float]:
    """Greedy-decode every held-out prompt (items with ``prompt_ids``, ``prompt_text`` and
    ``reference``, as ``SFTExample``) up to ``cfg.generation.max_new_tokens``; write them to
    ``eval_generations.parquet``. ``extra(prompts, generations)`` adds (columns, metrics), e.g.
    the auxiliary rewards of the generations."""
    generated = generate_responses(trainer, [e.prompt_ids for e in held_out], cfg.generation.max_new_tokens)
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    prompts = [e.prompt_text for e in held_out]
    if checker is not None:
        scores = checker.score(prompts, texts)
    else:
        scores = [float(t.strip() == e.reference.strip()) for t, e in zip(texts, held_out, strict=True)]
    correct = [s >= 1.0 for s in scores]
    columns, metrics = extra(prompts, texts) if extra is not None else ({}, {})
    pq.write_table(pa.table({"prompt": prompts, "reference": [e.reference for e in held_out], "generated": texts,
                             "score": scores, "correct": correct, **columns}), ctx.stage_dir / "eval_generations.parquet")
    return metrics | {
        "eval/exact_match": sum(correct) / len(correct),
        "eval/score_mean": sum(scores) / len(scores),
        "eval/response_length_mean": sum(len(g) for g in generated) / len(generated),
    }


def run(cfg: SFTStage, ctx: StageContext) -> dict[str, str]:
    policy_path = ctx.input("policy")
    tokenizer = load_tokenizer(policy_path, trust_remote_code=cfg.trainer.trust_remote_code)
    pad_id = pad_token_id(tokenizer)
    train = load_examples(ctx.input("data.train"), cfg, tokenizer)
    eval_path = ctx.input("data.eval")
    held_out = load_examples(eval_path, cfg, tokenizer, cfg.data.eval_examples) if eval_path else []
    gen = cfg.generation
    checker = FunctionReward(gen.checker) if gen.enabled and gen.checker else None
    s = cfg.schedule
    sampler = EpochSampler(len(train), s.sequences_per_step, s.seed)
    trainer = spawn_trainer(ctx, role="policy_trainer", model_path=policy_path, trainer=cfg.trainer, optim=cfg.optim,
                            steps=s.steps, per_step=s.sequences_per_step, per_microbatch=s.sequences_per_microbatch,
                            seed=s.seed)
    train_loop(
        ctx, trainer, steps=s.steps, eval_every=s.eval_every, unit="sequences",
        batches_per_epoch=sampler.batches_per_epoch,
        make_batch=lambda step: collate_sft([train[i] for i in sampler.indices(step)], pad_id), loss_fn=SFTLoss(),
        evaluate=(lambda: evaluate(cfg, ctx, trainer, held_out, tokenizer, checker)) if held_out else None,
        batch_metrics=padding_fraction,
    )
    out_dir = str(ctx.stage_dir / "model")
    trainer.broadcast(PolicyTrainer.save_hf, out_dir)
    return {"model": out_dir}
