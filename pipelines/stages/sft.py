"""Stage ``sft``: supervised fine-tuning on responses (prompt tokens masked).

Phases: ``load_data`` (driver: read, check, tokenize) → ``update`` × steps (policy-trainer group)
with ``eval`` (held-out loss + greedy decoding scored by exact match or a checker) at the start,
every ``eval_every`` steps and at the end → ``save`` (HF checkpoint, atomic).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import model_validator

from actors.policy_trainer import PolicyTrainer
from orchestrator.runtime.sharding import sharded_rows
from pipelines.data.formats import read_sft
from pipelines.data.lengths import LengthTally, report_lengths
from pipelines.data.sft import SFTExample, collate_sft, tokenize_sft
from pipelines.data.tokens import EpochSampler, load_tokenizer, pad_token_id
from pipelines.losses import SFTLoss, sft_row_nll
from pipelines.stages.base import Metric, PathOrRef, StageBase, StageKind, check_batches, trainer_numbers
from pipelines.stages.config import (
    GenerationEvalConfig,
    OptimConfig,
    SFTDataConfig,
    SFTScheduleConfig,
    TrainerConfig,
)
from pipelines.stages.training import score_generations, spawn_trainer, train_loop

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import ActorGroup
    from orchestrator.runtime.context import StageContext


class SFTStage(StageBase):
    """Supervised fine-tuning: causal-LM loss on responses only."""

    kind: Literal["sft"]
    policy: PathOrRef
    data: SFTDataConfig
    generation: GenerationEvalConfig = GenerationEvalConfig()
    optim: OptimConfig = OptimConfig()
    schedule: SFTScheduleConfig = SFTScheduleConfig()
    trainer: TrainerConfig = TrainerConfig()

    CHECKPOINT_EVERY: ClassVar[int] = 100
    MODEL_FIELD: ClassVar[str | None] = "policy"
    ROLE_FIELDS: ClassVar[dict[str, str]] = {"policy_trainer": "trainer"}
    HEADLINE: ClassVar[tuple[Metric, ...]] = (
        Metric("loss", "loss"), Metric("eval/exact_match", "eval_em", ranks=True),
        Metric("eval/loss", "eval_loss", lower_is_better=True, ranks=True),
        Metric("eval/perplexity", "eval_ppl", lower_is_better=True))
    ROLES: ClassVar[tuple[str, ...]] = ("policy_trainer",)
    PHASES: ClassVar[tuple[tuple[str, ...], ...]] = (("policy_trainer",),)
    OUTPUTS: ClassVar[dict[str, str]] = {"model": "model"}
    INPUTS: ClassVar[dict[str, tuple[str, str]]] = {
        "policy": ("model", "model"),
        "data.train": ("sft", "sft_train"),
        "data.eval": ("sft", "sft_eval"),
    }

    def function_rewards(self) -> list[str]:
        return self.generation.function_rewards()

    def role_configs(self) -> dict[str, Any]:
        return {"policy_trainer": self.trainer}

    def trainer_configs(self) -> dict[str, Any]:
        return {"policy_trainer": self.trainer}

    def longest_sequence(self) -> tuple[str, int] | None:
        return "data.max_length", self.data.max_length

    def numbers(self) -> dict[str, float]:
        s, t = self.schedule, self.trainer
        return trainer_numbers("sequences", s.sequences_per_step, s.sequences_per_microbatch, s.steps,
                               t.num_workers, t.zero_stage, 1)

    @model_validator(mode="after")
    def _batches_divide(self) -> SFTStage:
        s = self.schedule
        check_batches(s.sequences_per_step, s.sequences_per_microbatch, self.trainer.num_workers, "sequences")
        return self


def load_examples(path: str, cfg: SFTStage, tokenizer: Any, lengths: LengthTally, cap: int | None = None
                  ) -> list[SFTExample]:
    rows = read_sft(path, cfg.data.format, cfg.data.columns, limit=cap)
    examples = tokenize_sft(rows, tokenizer, lengths=lengths, source=path)
    lengths.finish()
    return examples


def evaluate(cfg: SFTStage, ctx: StageContext, trainer: ActorGroup, held_out: list[SFTExample], tokenizer: Any
             ) -> dict[str, float]:
    """Held-out token-mean NLL and, when enabled, greedy-decoding exact match."""
    pad_id = pad_token_id(tokenizer)
    shards, _ = sharded_rows(held_out, trainer.num_workers)
    results = trainer.shard(PolicyTrainer.evaluate, [collate_sft(s, pad_id) for s in shards], sft_row_nll)
    nll = torch.cat([r[0] for r in results])[: len(held_out)]
    count = torch.cat([r[1] for r in results])[: len(held_out)]
    loss = float(nll.sum() / count.sum())
    metrics = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
    if cfg.generation.enabled:
        metrics.update(score_generations(cfg.generation, ctx, trainer, held_out, tokenizer))
    return metrics


def run(cfg: SFTStage, ctx: StageContext) -> dict[str, str]:
    policy_path = ctx.input("policy")
    tokenizer = load_tokenizer(policy_path, trust_remote_code=cfg.trainer.trust_remote_code)
    pad_id = pad_token_id(tokenizer)
    paths = {"train": ctx.input("data.train"), "eval": ctx.input("data.eval")}
    lengths = {name: cfg.data.lengths(path) for name, path in paths.items() if path}
    train = load_examples(paths["train"], cfg, tokenizer, lengths["train"])
    held_out = (load_examples(paths["eval"], cfg, tokenizer, lengths["eval"], cfg.data.eval_examples)
                if paths["eval"] else [])
    ctx.log.params(report_lengths(lengths))
    s = cfg.schedule
    sampler = EpochSampler(len(train), s.sequences_per_step, s.seed)
    trainer = spawn_trainer(ctx, role="policy_trainer", model_path=policy_path, trainer=cfg.trainer, optim=cfg.optim,
                            steps=s.steps, per_step=s.sequences_per_step, per_microbatch=s.sequences_per_microbatch,
                            seed=s.seed)
    train_loop(
        ctx, trainer, steps=s.steps, eval_every=s.eval_every, unit="sequences",
        batches_per_epoch=sampler.batches_per_epoch,
        make_batch=lambda step: collate_sft([train[i] for i in sampler.indices(step)], pad_id), loss_fn=SFTLoss(),
        evaluate=(lambda: evaluate(cfg, ctx, trainer, held_out, tokenizer)) if held_out else None,
    )
    out_dir = str(ctx.stage_dir / "model")
    trainer.broadcast(PolicyTrainer.save_hf, out_dir)
    return {"model": out_dir}


STAGE = StageKind(SFTStage, run)
