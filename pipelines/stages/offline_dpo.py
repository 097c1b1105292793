"""Stage ``offline_dpo``: DPO on a fixed Parquet dataset of preference pairs.

Phases: ``load_data`` (driver: read, check, tokenize) → ``ref_logprobs`` (reference group, once,
cached in the stage directory; none for the reference-free ``dpo.loss_type`` simpo and orpo) →
``update`` × steps (policy-trainer group) with ``eval`` at the start, every ``eval_every`` steps
and at the end → ``save`` (HF checkpoint, atomic).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field, model_validator

from actors.policy_trainer import PolicyTrainer
from actors.reference import ReferenceModel
from pipelines.data import EpochSampler, PairStore, TokenizedPair, write_pair_store
from pipelines.formats import PAIR_FIELDS
from pipelines.rewards import FunctionReward
from pipelines.stages import auxiliary
from pipelines.stages.auxiliary import (
    AUXILIARY_FIELD,
    AuxiliaryRewardConfig,
    UPOConfig,
    auxiliary_inputs,
    check_auxiliary,
)
from pipelines.stages.config import (
    DPOConfig,
    GenerationEvalConfig,
    OptimConfig,
    PairDataConfig,
    PairScheduleConfig,
    PathOrRef,
    ReferenceConfig,
    RewardGroupConfig,
    StageBase,
    StageKind,
    TrainerConfig,
    check_batches,
    check_reference_role,
    reference_free,
    reference_from_trainer,
    reference_source,
    trainer_numbers,
)
from pipelines.stages.preference import (
    PairSet,
    dpo_loss_of,
    held_out_metrics,
    load_pair_texts,
    load_pairs,
    offline_function_rewards,
    offline_phases,
    offline_role_configs,
    sharded_logps,
    training_loss,
)
from pipelines.stages.training import (
    policy_inputs,
    score_generations,
    spawn_reference,
    spawn_trainer,
    train_loop,
)

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import ActorGroup
    from orchestrator.runtime.context import StageContext


class OfflineDPOStage(StageBase):
    """Offline DPO on a fixed dataset of preference pairs."""

    kind: Literal["offline_dpo"]
    policy: PathOrRef
    reference: PathOrRef | None = Field(None, description="default: the starting policy")
    data: PairDataConfig
    dpo: DPOConfig = DPOConfig()
    generation: GenerationEvalConfig = Field(
        GenerationEvalConfig(enabled=False),
        description="greedy decoding of the held-out pairs' prompts, scored against the chosen response or by a "
        "checker (off by default: a chosen response need not be the one right answer)",
    )
    optim: OptimConfig = OptimConfig()
    schedule: PairScheduleConfig = PairScheduleConfig()
    trainer: TrainerConfig = TrainerConfig()
    reference_group: ReferenceConfig = ReferenceConfig()
    auxiliary: tuple[AuxiliaryRewardConfig, ...] = AUXILIARY_FIELD
    upo: UPOConfig | None = Field(None, description="λ, τ, w_max of the auxiliary term (defaults with auxiliary)")
    reward_group: RewardGroupConfig = Field(RewardGroupConfig(), description="scores the auxiliary rewards")

    CHECKPOINT_EVERY: ClassVar[int] = 100
    ROLES: ClassVar[tuple[str, ...]] = ("reference", "policy_trainer", "reward")
    PHASES: ClassVar[tuple[tuple[str, ...], ...]] = (("reference",), ("policy_trainer",))  # reference log-probs first
    REFERENCE_BEFORE_TRAINING: ClassVar[bool] = True  # every reference log-prob is computed before step 1
    OUTPUTS: ClassVar[dict[str, str]] = {"model": "model"}
    INPUTS: ClassVar[dict[str, tuple[str, str]]] = {
        "policy": ("model", "model"),
        "reference": ("model", "model"),
        "data.train": ("pairs", "pairs_train"),
        "data.eval": ("pairs", "pairs_eval"),
    }

    def inputs(self) -> dict[str, tuple[str, str]]:
        return auxiliary_inputs(self)

    def phases(self) -> tuple[tuple[str, ...], ...]:
        return offline_phases(self)

    def function_rewards(self) -> list[str]:
        return offline_function_rewards(self)

    def role_configs(self) -> dict[str, Any]:
        return offline_role_configs(self)

    def numbers(self) -> dict[str, float | str]:
        s, t = self.schedule, self.trainer
        return trainer_numbers("pairs", s.pairs_per_step, s.pairs_per_microbatch, s.steps, t.num_workers,
                               t.zero_stage, 2) | {"reference_logprobs": reference_source(self)}

    @model_validator(mode="after")
    def _batches_divide(self) -> OfflineDPOStage:
        check_batches(self.schedule.pairs_per_step, self.schedule.pairs_per_microbatch, self.trainer.num_workers, "pairs")
        check_auxiliary(self)
        check_reference_role(self)
        return self


def reference_logps(cfg: OfflineDPOStage, ctx: StageContext, ref_path: str, sets: dict[str, Sequence[TokenizedPair]],
                    pad_id: int, trainer: ActorGroup | None = None) -> dict[str, PairSet]:
    """Reference log-probs for every pair, computed once and cached: by a reference group, or by the
    policy ``trainer`` when it is the reference (before its first step; a LoRA trainer with its
    adapters disabled)."""
    cache = ctx.stage_dir / "ref_logps.parquet"
    key = _cache_key(ref_path, sets)
    if cache.exists():
        table = pq.read_table(cache)
        if table.schema.metadata and table.schema.metadata.get(b"key") == key.encode():
            return _split_cached(table, sets)
    if trainer is not None:
        group, method = trainer, PolicyTrainer.evaluate_base if cfg.trainer.lora else PolicyTrainer.evaluate
    else:
        group, method = spawn_reference(cfg, ctx, ref_path), ReferenceModel.evaluate
        group.setup(ReferenceModel.setup)
    out: dict[str, PairSet] = {}
    columns: dict[str, list] = {"set": [], "chosen": [], "rejected": []}
    for name, pairs in sets.items():
        chosen, rejected = sharded_logps(group, method, pairs, pad_id)
        out[name] = PairSet(pairs, chosen, rejected)
        columns["set"] += [name] * len(pairs)
        columns["chosen"] += chosen.tolist()
        columns["rejected"] += rejected.tolist()
    if trainer is None:
        ctx.release(group)
    table = pa.table(columns).replace_schema_metadata({"key": key})
    pq.write_table(table, cache)
    return out


def _cache_key(ref_path: str, sets: dict[str, Sequence[TokenizedPair]]) -> str:
    """Reference model + exact token ids: a cached result is reused only for the same inputs."""
    digest = hashlib.sha256(ref_path.encode())
    for name, pairs in sets.items():
        digest.update(name.encode())
        digest.update(pairs.digest().encode() if isinstance(pairs, PairStore)
                      else repr([(p.prompt, p.chosen, p.rejected) for p in pairs]).encode())
    return digest.hexdigest()


def _split_cached(table: pa.Table, sets: dict[str, Sequence[TokenizedPair]]) -> dict[str, PairSet]:
    names = table.column("set").to_pylist()
    chosen = torch.tensor(table.column("chosen").to_pylist())
    rejected = torch.tensor(table.column("rejected").to_pylist())
    out = {}
    for name, pairs in sets.items():
        idx = [i for i, n in enumerate(names) if n == name]
        out[name] = PairSet(pairs, chosen[idx], rejected[idx])
    return out


@dataclass
class HeldOutPrompt:
    """A held-out prompt for greedy-decoding evaluation (the fields ``score_generations`` reads)."""

    prompt_ids: list[int]
    prompt_text: str
    reference: str


def held_out_prompts(texts: dict[str, list[str]], pairs: list[TokenizedPair]) -> list[HeldOutPrompt]:
    """The held-out pairs' prompts, with the chosen response as the reference answer."""
    return [HeldOutPrompt(p.prompt, text, chosen)
            for p, text, chosen in zip(pairs, texts["prompt_plain"], texts["chosen_plain"], strict=True)]


def evaluate(cfg: OfflineDPOStage, ctx: StageContext, trainer: ActorGroup, held_out: PairSet, pad_id: int,
             prompts: list[HeldOutPrompt], tokenizer: Any, checker: FunctionReward | None,
             extra: Any = None) -> dict[str, float]:
    """Held-out implicit-reward accuracy and ranking accuracy of the current policy, and with
    ``generation.enabled`` the greedy-decoding task metric on the same pairs' prompts (plus
    ``extra``'s metrics of the generations: the auxiliary rewards)."""
    chosen, rejected = sharded_logps(trainer, PolicyTrainer.evaluate, held_out.pairs, pad_id)
    metrics, cr, rr = held_out_metrics(dpo_loss_of(cfg), held_out, chosen, rejected)
    if held_out.aux is not None:
        metrics.update(auxiliary.tie_accuracy(cfg, held_out.aux, cr, rr))
    if prompts:
        metrics.update(score_generations(cfg, ctx, trainer, prompts, tokenizer, checker, extra))
    return metrics


def score_auxiliary(cfg: OfflineDPOStage, ctx: StageContext, data: dict[str, PairSet], texts: dict[str, dict]):
    """Phase ``score_auxiliary`` (UPO): the ``reward`` group scores both sides of every training and
    held-out pair under each auxiliary reward (cached); the pair sets get their rewards and weights.
    Returns the scorer of held-out generations, which keeps the group for the rest of the stage."""
    scorer = auxiliary.spawn_scorer(cfg, ctx)
    for name, pair_set in data.items():
        plain = {k: texts[name][f"{k}_plain"] for k in PAIR_FIELDS}  # what function rewards read
        pair_set.aux = auxiliary.build_term(cfg, ctx, scorer, plain,
                                            auxiliary.CACHE_FILE if name == "train" else auxiliary.EVAL_CACHE_FILE)
    return auxiliary.generation_scorer(cfg, scorer)


def run(cfg: OfflineDPOStage, ctx: StageContext) -> dict[str, str]:
    policy_path, ref_path, tokenizer, pad_id = policy_inputs(cfg, ctx)
    paths = {"train": ctx.input("data.train"), "eval": ctx.input("data.eval")}
    d = cfg.data
    # The training pairs are tokenized batch by batch into a memory-mapped store (memory flat in the
    # file's length); the held-out pairs (at most eval_pairs) and, for UPO's designer rewards, the
    # training texts are held as texts.
    sets: dict[str, Any] = {"train": write_pair_store(paths["train"], d.columns, tokenizer,
                                                      ctx.stage_dir / "pairs_train.arrow", max_length=d.max_length)}
    texts = {"train": load_pair_texts(paths["train"], tokenizer, d.columns)} if cfg.auxiliary else {}
    if paths["eval"]:
        texts["eval"] = load_pair_texts(paths["eval"], tokenizer, d.columns, d.eval_pairs)
        sets["eval"] = load_pairs(paths["eval"], tokenizer, d.max_length, texts=texts["eval"])
    s = cfg.schedule
    sampler = EpochSampler(len(sets["train"]), s.pairs_per_step, s.seed)

    def start_trainer() -> ActorGroup:
        return spawn_trainer(ctx, role="policy_trainer", model_path=policy_path, trainer=cfg.trainer, optim=cfg.optim,
                             steps=s.steps, per_step=s.pairs_per_step, per_microbatch=s.pairs_per_microbatch, seed=s.seed)

    shared = start_trainer() if reference_from_trainer(cfg) else None  # the reference too, before training
    if reference_free(cfg):  # SimPO, ORPO
        data = {name: PairSet(pairs, None, None) for name, pairs in sets.items()}
    else:
        data = reference_logps(cfg, ctx, ref_path, sets, pad_id, shared)
    loss_fn = training_loss(cfg)
    trainer = shared or start_trainer()
    extra, start_metrics = None, None
    if cfg.auxiliary:  # UPO: the designer's rewards of every response, scored once
        timing: dict[str, float] = {}
        with ctx.timed("score_auxiliary", timing):
            extra = score_auxiliary(cfg, ctx, data, texts)
            value = auxiliary.with_value_baseline(cfg, data["train"].aux, [p.prompt for p in sets["train"][:]], trainer,
                                                  PolicyTrainer.evaluate, pad_id) if cfg.upo.baseline == "value" else {}
        start_metrics = timing | data["train"].aux.data_metrics() | value
    held_out = data.get("eval")
    gen = cfg.generation
    prompts = held_out_prompts(texts["eval"], sets["eval"]) if held_out and gen.enabled else []
    checker = FunctionReward(gen.checker) if prompts and gen.checker else None
    train_loop(
        ctx, trainer, steps=s.steps, eval_every=s.eval_every, unit="pairs", batches_per_epoch=sampler.batches_per_epoch,
        make_batch=lambda step: data["train"].batch(sampler.indices(step), pad_id), loss_fn=loss_fn,
        start_metrics=start_metrics,
        evaluate=(lambda: evaluate(cfg, ctx, trainer, held_out, pad_id, prompts, tokenizer, checker, extra))
        if held_out else None,
    )
    out_dir = str(ctx.stage_dir / "model")
    trainer.broadcast(PolicyTrainer.save_hf, out_dir)
    return {"model": out_dir}


STAGE = StageKind(OfflineDPOStage, run)
