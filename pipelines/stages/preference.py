"""The offline preference family (``offline_dpo``, ``kto``): ``PreferenceStage``, the config both have,
and ``PreferenceRun``, the run both share.

Phases: ``load_data`` (the kind's: read, check, tokenize) → ``ref_logprobs`` (every training and
held-out row, once, cached in the stage directory; by the policy trainer before its first step when
the reference is the starting policy; none for a reference-free loss) → with ``auxiliary`` rewards
(UPO) ``score_auxiliary`` → ``update`` × steps (the policy-trainer group) with ``eval`` at the start,
every ``eval_every`` steps and at the end → ``save`` (HF checkpoint, atomic).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field

from actors.policy_trainer import PolicyTrainer
from actors.reference import ReferenceModel
from pipelines.data.batches import TensorBatch
from pipelines.data.tokens import PairStore, TokenizedPair
from pipelines.stages.auxiliary import AuxiliaryScorer, UPOFields, spawn_scorer
from pipelines.stages.base import Metric, ReferenceSource
from pipelines.stages.config import GenerationEvalConfig, LengthFields, PolicyStage, RewardGroupConfig, StepSchedule
from pipelines.stages.pairs import PairSet, sharded_logps
from pipelines.stages.training import (
    Extra,
    policy_inputs,
    score_generations,
    spawn_reference,
    spawn_trainer,
    train_loop,
)

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import ActorGroup
    from orchestrator.runtime.context import StageContext


class PreferenceStage(UPOFields, PolicyStage):
    """A policy trained offline on fixed preference data against a reference, optionally with a
    designer's auxiliary rewards beside the preferences (UPO)."""

    generation: GenerationEvalConfig = Field(
        GenerationEvalConfig(enabled=False),
        description="greedy decoding of the held-out pairs' prompts, scored against the chosen response or by a "
        "checker (off by default: a chosen response need not be the one right answer)",
    )
    data: LengthFields  # each kind's own data section: its token limits bound the model's positions
    schedule: StepSchedule = StepSchedule()
    reward_group: RewardGroupConfig = Field(RewardGroupConfig(), description="scores the auxiliary rewards")

    CHECKPOINT_EVERY: ClassVar[int] = 100
    ROLE_FIELDS: ClassVar[dict[str, str]] = PolicyStage.ROLE_FIELDS | {"reward": "reward_group"}
    ROLES: ClassVar[tuple[str, ...]] = ("reference", "policy_trainer", "reward")
    PHASES: ClassVar[tuple[tuple[str, ...], ...]] = (("reference",), ("policy_trainer",))  # reference log-probs first
    REFERENCE_BEFORE_TRAINING: ClassVar[bool] = True  # every reference log-prob is computed before step 1
    OUTPUTS: ClassVar[dict[str, str]] = {"model": "model"}
    HEADLINE: ClassVar[tuple[Metric, ...]] = (
        Metric("loss", "loss"), Metric("rewards/accuracies", "acc"),
        Metric("eval/exact_match", "eval_em", ranks=True), Metric("eval/rewards/accuracies", "eval_acc", ranks=True),
        Metric("eval/ranking_accuracy", "eval_rank"), Metric("eval/rewards/accuracies_aux_ties", "eval_acc_ties"),
        Metric("eval/loss", "eval_loss", lower_is_better=True, ranks=True),
    )

    def longest_sequence(self) -> tuple[str, int] | None:
        return "data.max_length", self.data.max_length

    def headline(self) -> tuple[Metric, ...]:
        return self.HEADLINE + tuple(Metric(f"eval/aux/{a.name}_mean", a.name) for a in self.auxiliary)

    def phases(self) -> tuple[tuple[str, ...], ...]:
        """The reference log-probs first; the auxiliary rewards (UPO) are scored before training and on
        held-out generations during it, beside the trainer."""
        return (("reference",), ("reward", "policy_trainer")) if self.auxiliary else self.PHASES

    def function_rewards(self) -> list[str]:
        """The checker of the held-out generations (when they are decoded) and the auxiliary functions."""
        return self.generation.function_rewards() + super().function_rewards()

    def own_roles(self) -> dict[str, Any]:
        roles = {"reference": self.reference_group, "policy_trainer": self.trainer}
        return roles | ({"reward": self.reward_group} if self.auxiliary else {})


@dataclass
class HeldOutPrompt:
    """A held-out prompt for greedy-decoding evaluation (the fields ``score_generations`` reads)."""

    prompt_ids: list[int]
    prompt_text: str
    reference: str


def held_out_prompts(texts: dict[str, list[str]], pairs: Sequence[TokenizedPair]) -> list[HeldOutPrompt]:
    """The held-out pairs' prompts, with the chosen response as the reference answer."""
    return [HeldOutPrompt(p.prompt, text, chosen)
            for p, text, chosen in zip(pairs, texts["prompt_plain"], texts["chosen_plain"], strict=True)]


class PreferenceRun:
    """What an offline preference stage's run shares: its inputs, its trainer (started before the
    reference log-probs when it is the reference), the cached reference log-probs, the auxiliary
    rewards' scorer, the held-out evaluation, the training loop and the saved policy."""

    def __init__(self, cfg: PreferenceStage, ctx: StageContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self._trainer: ActorGroup | None = None
        self._starting: Future[ActorGroup] | None = None
        if cfg.reference_source() is not ReferenceSource.GROUP:  # no reference model to load before it
            # the trainer's process starts, imports and loads its model while the driver reads and tokenizes
            self._starting = ThreadPoolExecutor(1, thread_name_prefix="trainer-start").submit(
                self._spawn, ctx.input("policy"))
        self.policy_path, self.ref_path, self.tokenizer, self.pad_id = policy_inputs(cfg, ctx)

    def _spawn(self, policy_path: str) -> ActorGroup:
        s = self.cfg.schedule
        return spawn_trainer(self.ctx, role="policy_trainer", model_path=policy_path, trainer=self.cfg.trainer,
                             optim=self.cfg.optim, steps=s.steps, per_step=s.per_step, per_microbatch=s.per_microbatch,
                             seed=s.seed)

    def __enter__(self) -> PreferenceRun:
        return self

    def __exit__(self, *exc: object) -> None:
        """Wait for a trainer start under way (a stage that failed before it needed the trainer)."""
        if self._starting is not None and self._trainer is None:
            try:
                self._starting.result()
            except Exception:  # noqa: BLE001 - the stage's own error is the one to report
                pass

    def start_trainer(self) -> ActorGroup:
        """The policy trainer: started at the run's creation (when no reference group loads first), or now."""
        if self._trainer is None:
            self._trainer = self._starting.result() if self._starting is not None else self._spawn(self.policy_path)
        return self._trainer

    @property
    def trainer(self) -> ActorGroup:
        if self._trainer is None:
            raise RuntimeError("the policy trainer has not started (start_trainer)")
        return self._trainer

    def reference(self, sets: dict[str, Sequence[TokenizedPair]]) -> dict[str, PairSet]:
        """Phase ``ref_logprobs``: every pair set with its reference log-probs (none for a
        reference-free loss), computed by the trainer, started first, when it is the reference."""
        source = self.cfg.reference_source()
        if source is ReferenceSource.NONE:  # SimPO, ORPO
            return {name: PairSet(pairs, None, None) for name, pairs in sets.items()}
        shared = self.start_trainer() if source is ReferenceSource.TRAINER else None
        return reference_logps(self.cfg, self.ctx, self.ref_path, sets, self.pad_id, shared)

    def scorer(self) -> AuxiliaryScorer:
        """The reward group of the auxiliary rewards (UPO), set up."""
        objective = self.cfg.auxiliary_objective()
        assert objective is not None
        return spawn_scorer(self.ctx, objective, self.cfg.reward_group,
                            trust_remote_code=self.cfg.trainer.trust_remote_code)

    def evaluate(self, held_out: PairSet, judge: Callable[[torch.Tensor, torch.Tensor], tuple[dict[str, float], ...]],
                 prompts: list[HeldOutPrompt], extra: Extra | None) -> dict[str, float]:
        """Held-out metrics of the current policy: ``judge(chosen, rejected)`` of its summed log-probs of
        the held-out pairs gives (metrics, chosen implicit rewards, rejected implicit rewards); with UPO
        the accuracy on pairs that tie on the auxiliary reward; with ``generation.enabled`` the
        greedy-decoding task metric on the pairs' prompts (and ``extra``'s metrics of the generations)."""
        chosen, rejected = sharded_logps(self.trainer, PolicyTrainer.evaluate, held_out.pairs, self.pad_id)
        metrics, cr, rr = judge(chosen, rejected)
        objective = self.cfg.auxiliary_objective()
        if held_out.aux is not None and objective is not None:
            metrics.update(objective.tie_accuracy(held_out.aux, cr, rr))
        if prompts:
            metrics.update(score_generations(self.cfg.generation, self.ctx, self.trainer, prompts, self.tokenizer,
                                             extra))
        return metrics

    def train(self, *, batches_per_epoch: int, make_batch: Callable[[int], TensorBatch], loss_fn: Any,
              evaluate: Callable[[], dict[str, float]] | None, start_metrics: dict[str, float] | None
              ) -> dict[str, str]:
        """Phase ``update`` × steps (``training.train_loop``), then the policy saved: the stage's outputs."""
        s = self.cfg.schedule
        train_loop(self.ctx, self.trainer, steps=s.steps, eval_every=s.eval_every, unit=s.UNIT,
                   batches_per_epoch=batches_per_epoch, make_batch=make_batch, loss_fn=loss_fn, evaluate=evaluate,
                   start_metrics=start_metrics)
        out_dir = str(self.ctx.stage_dir / "model")
        self.trainer.broadcast(PolicyTrainer.save_hf, out_dir)
        return {"model": out_dir}


def reference_logps(cfg: PreferenceStage, ctx: StageContext, ref_path: str, sets: dict[str, Sequence[TokenizedPair]],
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
        group, method = spawn_reference(ctx, cfg.reference_group, ref_path, cfg.trainer), ReferenceModel.evaluate
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
        ctx.roles.release(group)
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
