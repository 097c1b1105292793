"""Stage ``reward_model``: a one-label sequence classifier trained on preference pairs.

Phases: ``load_data`` (driver) → ``update`` × steps (trainer group, Bradley–Terry loss with optional
per-pair margins and reward centring) with ``eval`` at the start, every ``eval_every`` steps and at
the end → ``stats`` (reward mean/std over training responses, stored with the checkpoint so later
stages can normalise) → ``save`` (HF checkpoint + ``reward_stats.json``, atomic).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from actors.modeling import pair_scores
from actors.policy_trainer import PolicyTrainer
from actors.reward import STATS_FILE
from orchestrator.runtime.sharding import sharded_rows
from pipelines.algorithms.reward_model import bradley_terry_loss, reward_metrics
from pipelines.data.batches import PreferenceBatch
from pipelines.data.formats import pair_texts, read_pairs
from pipelines.data.lengths import LengthTally, report_lengths
from pipelines.data.tokens import (
    EpochSampler,
    TokenizedPair,
    collate_pairs,
    load_tokenizer,
    pad_token_id,
    read_float_column,
    tokenize_pairs,
    write_pair_store,
)
from pipelines.losses import RewardModelLoss
from pipelines.stages.base import Metric, PathOrRef, StageBase, StageKind, check_batches, trainer_numbers
from pipelines.stages.config import (
    OptimConfig,
    PairScheduleConfig,
    RewardDataConfig,
    RewardLossConfig,
    TrainerConfig,
)
from pipelines.stages.training import spawn_trainer, train_loop

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import ActorGroup
    from orchestrator.runtime.context import StageContext


class RewardModelStage(StageBase):
    """Reward-model training: a one-label sequence classifier on preference pairs (Bradley–Terry)."""

    kind: Literal["reward_model"]
    model: PathOrRef = Field(description="causal-LM checkpoint to start from (base or SFT output)")
    data: RewardDataConfig
    loss: RewardLossConfig = RewardLossConfig()
    optim: OptimConfig = OptimConfig()
    schedule: PairScheduleConfig = PairScheduleConfig()
    trainer: TrainerConfig = TrainerConfig()
    stats_pairs: int = Field(4096, ge=1, description="training pairs scored at the end for reward mean/std")

    CHECKPOINT_EVERY: ClassVar[int] = 100
    MODEL_FIELD: ClassVar[str | None] = "model"
    ROLE_FIELDS: ClassVar[dict[str, str]] = {"reward_trainer": "trainer"}
    HEADLINE: ClassVar[tuple[Metric, ...]] = (
        Metric("loss", "loss"), Metric("eval/accuracy", "eval_acc", ranks=True), Metric("eval/margin", "eval_margin"),
        Metric("eval/loss", "eval_loss", lower_is_better=True, ranks=True))
    ROLES: ClassVar[tuple[str, ...]] = ("reward_trainer",)
    PHASES: ClassVar[tuple[tuple[str, ...], ...]] = (("reward_trainer",),)
    OUTPUTS: ClassVar[dict[str, str]] = {"reward_model": "reward_model"}
    INPUTS: ClassVar[dict[str, tuple[str, str]]] = {
        "model": ("model", "model"),
        "data.train": ("pairs", "pairs_train"),
        "data.eval": ("pairs", "pairs_eval"),
    }

    def role_configs(self) -> dict[str, Any]:
        return {"reward_trainer": self.trainer}

    def trainer_configs(self) -> dict[str, Any]:
        return {"reward_trainer": self.trainer}

    def longest_sequence(self) -> tuple[str, int] | None:
        return "data.max_length", self.data.max_length

    def numbers(self) -> dict[str, float]:
        s, t = self.schedule, self.trainer
        return trainer_numbers("pairs", s.pairs_per_step, s.pairs_per_microbatch, s.steps, t.num_workers,
                               t.zero_stage, 2)

    @model_validator(mode="after")
    def _batches_divide(self) -> RewardModelStage:
        s = self.schedule
        check_batches(s.pairs_per_step, s.pairs_per_microbatch, self.trainer.num_workers, "pairs")
        return self


@dataclass
class RewardPairs:
    """Tokenized pairs (a list, or a memory-mapped ``PairStore``) with their optional margins m (N,)."""

    pairs: Sequence[TokenizedPair]
    margin: torch.Tensor | None

    def batch(self, idx: list[int], pad_id: int) -> PreferenceBatch:
        batch = collate_pairs([self.pairs[i] for i in idx], pad_id)
        batch.margin = None if self.margin is None else self.margin[idx]
        return batch


def load_reward_pairs(path: str, cfg: RewardModelStage, tokenizer: Any, lengths: LengthTally, cap: int | None = None,
                      store: Path | None = None) -> RewardPairs:
    """The pairs of ``path`` (at most ``cap``) in memory, or all of them tokenized into a memory-mapped
    ``store`` file (memory flat in the file's length), under the length policy of ``lengths``; the
    margins of the rows kept."""
    if store is not None:
        pairs: Sequence[TokenizedPair] = write_pair_store(path, cfg.data.columns, tokenizer, store, lengths=lengths)
        rows = pairs.rows()
    else:
        texts = pair_texts(read_pairs(path, cfg.data.columns, limit=cap), tokenizer, path)
        pairs = tokenize_pairs(texts, tokenizer, lengths=lengths, source=path)
        lengths.finish()
        rows = [p.row for p in pairs]
    margin = None
    if cfg.data.margin_column:
        margin = torch.tensor(read_float_column(path, cfg.data.margin_column))[rows]
    return RewardPairs(pairs, margin)


def score_pairs(trainer: ActorGroup, pairs: list[TokenizedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (N,), rejected (N,)) rewards, rows split across the trainer ranks."""
    shards, _ = sharded_rows(pairs, trainer.num_workers)
    results = trainer.shard(PolicyTrainer.evaluate, [collate_pairs(s, pad_id) for s in shards], pair_scores)
    n = len(pairs)
    return torch.cat([c for c, _ in results])[:n], torch.cat([r for _, r in results])[:n]


def evaluate(trainer: ActorGroup, held_out: RewardPairs, pad_id: int) -> dict[str, float]:
    chosen, rejected = score_pairs(trainer, held_out.pairs, pad_id)
    metrics = {f"eval/{k}": float(v) for k, v in reward_metrics(chosen, rejected).items()}
    metrics["eval/loss"] = float(bradley_terry_loss(chosen, rejected, held_out.margin).mean())
    return metrics


def reward_stats(trainer: ActorGroup, pairs: list[TokenizedPair], pad_id: int) -> dict[str, float]:
    """Mean and std of the trained model's rewards over both responses of the given pairs."""
    chosen, rejected = score_pairs(trainer, pairs, pad_id)
    both = torch.cat([chosen, rejected])
    return {"mean": float(both.mean()), "std": float(both.std(unbiased=False)), "num_rewards": int(both.numel())}


def run(cfg: RewardModelStage, ctx: StageContext) -> dict[str, str]:
    model_path = ctx.input("model")
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trainer.trust_remote_code)
    pad_id = pad_token_id(tokenizer)
    paths = {"train": ctx.input("data.train"), "eval": ctx.input("data.eval")}
    lengths = {name: cfg.data.lengths(path) for name, path in paths.items() if path}
    train = load_reward_pairs(paths["train"], cfg, tokenizer, lengths["train"],
                              store=ctx.stage_dir / "pairs_train.arrow")
    held_out = (load_reward_pairs(paths["eval"], cfg, tokenizer, lengths["eval"], cfg.data.eval_pairs)
                if paths["eval"] else None)
    ctx.log.params(report_lengths(lengths))
    s = cfg.schedule
    sampler = EpochSampler(len(train.pairs), s.pairs_per_step, s.seed)
    trainer = spawn_trainer(ctx, role="reward_trainer", model_path=model_path, trainer=cfg.trainer, optim=cfg.optim,
                            steps=s.steps, per_step=s.pairs_per_step, per_microbatch=s.pairs_per_microbatch,
                            seed=s.seed, model_kind="reward_model")
    train_loop(
        ctx, trainer, steps=s.steps, eval_every=s.eval_every, unit="pairs", batches_per_epoch=sampler.batches_per_epoch,
        make_batch=lambda step: train.batch(sampler.indices(step), pad_id),
        loss_fn=RewardModelLoss(cfg.loss.centering_coef),
        evaluate=(lambda: evaluate(trainer, held_out, pad_id)) if held_out else None,
    )
    stats = reward_stats(trainer, train.pairs[: cfg.stats_pairs], pad_id)
    ctx.log.metrics({"stats/reward_mean": stats["mean"], "stats/reward_std": stats["std"]}, step=s.steps)
    out_dir = str(ctx.stage_dir / "model")
    stats_text = json.dumps(stats | {"source": "training pairs, chosen and rejected"}, indent=1)
    trainer.broadcast(PolicyTrainer.save_hf, out_dir, {STATS_FILE: stats_text})
    return {"reward_model": out_dir}


STAGE = StageKind(RewardModelStage, run)
