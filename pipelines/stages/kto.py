"""Stage ``kto``: Kahneman–Tversky Optimization on unpaired examples (``pipelines.algorithms.kto``).

Data: an unpaired file (``prompt``, ``completion``, boolean ``label``: desirable or not), or a pair
file, whose pairs are split into a desirable (chosen) and an undesirable (rejected) row. Each row is
given, once and by a seeded permutation, another row's completion: the mismatched pair (x_i, y'_i)
from which the loss estimates its reference point z0 = KL(π ‖ π_ref) per micro-batch (the KTO
paper's estimator; a mismatched completion longer than the row's room under ``data.max_length`` is
cut there). Held-out data are preference pairs: the implicit reward β·log π/π_ref ranks their two
sides (``eval/rewards/accuracies``).

Phases as offline DPO: ``load_data`` → ``ref_logprobs`` (every row and its mismatched completion,
once, cached; by the trainer before its first step when the reference is the starting policy) →
with ``auxiliary`` rewards (UPO on KTO) ``score_auxiliary`` → ``update`` × steps with ``eval`` → ``save``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from actors.policy_trainer import PolicyTrainer
from pipelines.algorithms.dpo import preference_metrics
from pipelines.batches import KTOBatch
from pipelines.data import EpochSampler, TokenizedPair, collate_pairs, encode_completions
from pipelines.errors import DataError
from pipelines.formats import (
    PAIR_FIELDS,
    UNPAIRED_FIELDS,
    plain_completion,
    plain_prompt,
    read_preferences,
    render_completion,
    render_prompt,
)
from pipelines.losses import KTOLoss
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
    COLUMNS_DOC,
    Frozen,
    GenerationEvalConfig,
    OptimConfig,
    PathOrRef,
    ReferenceConfig,
    RewardGroupConfig,
    StageBase,
    StageKind,
    TrainerConfig,
    check_batches,
    check_reference_role,
    reference_from_trainer,
    reference_source,
    trainer_numbers,
)
from pipelines.stages.offline_dpo import held_out_prompts, reference_logps
from pipelines.stages.preference import (
    PairSet,
    load_pair_texts,
    load_pairs,
    offline_function_rewards,
    offline_phases,
    offline_role_configs,
    sharded_logps,
)
from pipelines.stages.training import policy_inputs, score_generations, spawn_trainer, train_loop

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import ActorGroup
    from orchestrator.runtime.context import StageContext

class KTOConfig(Frozen):
    """KTO's loss; see pipelines.algorithms.kto.kto_loss. The paper advises weights with
    λ_D·n_D / (λ_U·n_U) in [1, 4/3] (n: desirable and undesirable rows; ``data/desirable_fraction``)."""

    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0, description="λ_D")
    undesirable_weight: float = Field(1.0, gt=0, description="λ_U")


class UnpairedDataConfig(Frozen):
    """Training rows: unpaired (prompt, completion, label) or preference pairs (split into a desirable
    and an undesirable row); held-out data: preference pairs. Texts or conversations; see docs/data.md."""

    train: PathOrRef
    eval: PathOrRef | None = Field(None, description="held-out preference pairs (prompt, chosen, rejected)")
    columns: dict[str, str] = Field({}, description=COLUMNS_DOC + "; unpaired: {completion: answer, label: liked}")
    max_length: int = Field(128, ge=4, description="prompt + completion tokens; longer rows are an error")
    eval_pairs: int | None = Field(None, ge=1, description="cap on held-out pairs evaluated")


class ExampleScheduleConfig(Frozen):
    """How long and with which batches a stage that trains on single examples trains."""

    steps: int = Field(100, ge=1, description="optimizer steps")
    examples_per_step: int = Field(32, ge=2, description="global batch: examples per optimizer step")
    examples_per_microbatch: int = Field(16, ge=1, description="examples in one forward/backward on one worker")
    eval_every: int = Field(0, ge=0, description="steps between evaluations; 0 = only at start and end")
    seed: int = Field(0, description="batch order and the mismatched completions of the reference point")


class KTOStage(StageBase):
    """KTO on unpaired (or split paired) preference data; UPO on KTO with ``auxiliary`` rewards."""

    kind: Literal["kto"]
    policy: PathOrRef
    reference: PathOrRef | None = Field(None, description="default: the starting policy")
    data: UnpairedDataConfig
    kto: KTOConfig = KTOConfig()
    generation: GenerationEvalConfig = Field(
        GenerationEvalConfig(enabled=False),
        description="greedy decoding of the held-out pairs' prompts, scored against the chosen response or by a checker",
    )
    optim: OptimConfig = OptimConfig()
    schedule: ExampleScheduleConfig = ExampleScheduleConfig()
    trainer: TrainerConfig = TrainerConfig()
    reference_group: ReferenceConfig = ReferenceConfig()
    auxiliary: tuple[AuxiliaryRewardConfig, ...] = AUXILIARY_FIELD
    upo: UPOConfig | None = Field(None, description="λ, τ, w_max of the auxiliary term (defaults with auxiliary)")
    reward_group: RewardGroupConfig = Field(RewardGroupConfig(), description="scores the auxiliary rewards")

    CHECKPOINT_EVERY: ClassVar[int] = 100
    ROLES: ClassVar[tuple[str, ...]] = ("reference", "policy_trainer", "reward")
    PHASES: ClassVar[tuple[tuple[str, ...], ...]] = (("reference",), ("policy_trainer",))
    REFERENCE_BEFORE_TRAINING: ClassVar[bool] = True
    OUTPUTS: ClassVar[dict[str, str]] = {"model": "model"}
    INPUTS: ClassVar[dict[str, tuple[str, str]]] = {
        "policy": ("model", "model"),
        "reference": ("model", "model"),
        "data.train": ("preferences", "pairs_train"),
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
        return trainer_numbers("examples", s.examples_per_step, s.examples_per_microbatch, s.steps, t.num_workers,
                               t.zero_stage, 2) | {"reference_logprobs": reference_source(self)}

    @model_validator(mode="after")
    def _consistent(self) -> KTOStage:
        s = self.schedule
        check_batches(s.examples_per_step, s.examples_per_microbatch, self.trainer.num_workers, "examples")
        unknown = sorted(set(self.data.columns) - set(UNPAIRED_FIELDS) - set(PAIR_FIELDS))
        if unknown:
            raise ValueError(f"data.columns: unknown field(s) {unknown}; KTO reads {list(UNPAIRED_FIELDS)} or "
                             f"{list(PAIR_FIELDS)}")
        check_auxiliary(self)
        check_reference_role(self)
        return self


@dataclass
class KTOSet:
    """Tokenized training rows: (prompt, completion, mismatched completion) as a ``TokenizedPair``
    (chosen = the completion, rejected = the mismatched one), their labels, and once computed the
    reference log-probs of both and with UPO the auxiliary rewards and weights of the completions."""

    rows: list[TokenizedPair]
    desirable: torch.Tensor  # (N,) 1.0 desirable, 0.0 undesirable
    ref: torch.Tensor | None = None  # (N,)
    ref_kl: torch.Tensor | None = None  # (N,)
    aux_rewards: torch.Tensor | None = None  # (N, K)
    aux_weights: torch.Tensor | None = None  # (N,)

    def batch(self, idx: list[int], pad_id: int) -> KTOBatch:
        if self.ref is None or self.ref_kl is None:
            raise RuntimeError("KTOSet.batch before the reference log-probs were computed")
        p = collate_pairs([self.rows[i] for i in idx], pad_id)
        aux = (None, None) if self.aux_weights is None or self.aux_rewards is None else \
            (self.aux_rewards[idx], self.aux_weights[idx])
        return KTOBatch(p.chosen_input_ids, p.chosen_attention_mask, p.chosen_loss_mask, p.rejected_input_ids,
                        p.rejected_attention_mask, p.rejected_loss_mask, self.desirable[idx], self.ref[idx],
                        self.ref_kl[idx], *aux)


def mismatched(n: int, seed: int) -> list[int]:
    """For each of n ≥ 2 rows, another row (never itself) whose completion it is paired with: the
    successor of the row in a seeded permutation."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    partner = [0] * n
    for i, row in enumerate(order):
        partner[row] = order[(i + 1) % n]
    return partner


def load_rows(path: str, tokenizer: Any, columns: dict[str, str], max_length: int, seed: int
              ) -> tuple[KTOSet, dict[str, list[str]]]:
    """Read, render and tokenize the training rows (``formats.read_preferences``); their plain texts
    (what function rewards see: ``prompt``, ``completion``) come back beside them.

    Raises:
        DataError: fewer than 2 rows, or a row over ``max_length`` tokens (naming the file and row).
    """
    read = read_preferences(path, columns)
    if len(read) < 2:
        raise DataError(f"{path}: KTO needs at least 2 rows (each row's reference point uses another row's "
                        f"completion), found {len(read)}")
    where = [f"{path}: row {r}" for r in read.file_rows]
    prompts, completions = encode_completions(
        tokenizer, [render_prompt(tokenizer, p, w) for p, w in zip(read.prompt, where, strict=True)],
        [render_completion(tokenizer, p, c, w) for p, c, w in zip(read.prompt, read.completion, where, strict=True)])
    for p, c, w in zip(prompts, completions, where, strict=True):
        if len(p) + len(c) > max_length:
            raise DataError(f"{w} is {len(p) + len(c)} tokens (prompt + completion + EOS), over "
                            f"data.max_length={max_length}")
    partner = mismatched(len(prompts), seed)
    rows = [TokenizedPair(p, c, completions[partner[i]][: max(1, max_length - len(p))])
            for i, (p, c) in enumerate(zip(prompts, completions, strict=True))]
    plain = {"prompt": [plain_prompt(p) for p in read.prompt],
             "completion": [plain_completion(c) for c in read.completion]}
    return KTOSet(rows, torch.tensor(read.label, dtype=torch.float32)), plain


def kto_loss_of(cfg: KTOStage) -> KTOLoss:
    k = cfg.kto
    upo = (cfg.upo.coef, auxiliary.names(cfg), cfg.upo.responses == "preferred") if cfg.auxiliary else (0.0, (), False)
    return KTOLoss(k.beta, k.desirable_weight, k.undesirable_weight, *upo)


def evaluate(cfg: KTOStage, ctx: StageContext, trainer: ActorGroup, held_out: PairSet, pad_id: int,
             prompts: list[Any], tokenizer: Any, checker: FunctionReward | None, extra: Any = None) -> dict[str, float]:
    """Held-out pairs: the implicit reward β·(log π − log π_ref) of both sides (``eval/rewards/*``,
    accuracy = chosen above rejected), the policy's own ranking, with UPO the accuracy on pairs that
    tie on the auxiliary reward, and with ``generation.enabled`` the greedy-decoding task metric."""
    chosen, rejected = sharded_logps(trainer, PolicyTrainer.evaluate, held_out.pairs, pad_id)
    assert held_out.ref_chosen is not None and held_out.ref_rejected is not None
    beta = cfg.kto.beta
    cr, rr = beta * (chosen - held_out.ref_chosen), beta * (rejected - held_out.ref_rejected)
    metrics = {f"eval/{k}": float(v) for k, v in preference_metrics(cr, rr, chosen, rejected).items()}
    if held_out.aux is not None:
        metrics.update(auxiliary.tie_accuracy(cfg, held_out.aux, cr, rr))
    if prompts:
        metrics.update(score_generations(cfg, ctx, trainer, prompts, tokenizer, checker, extra))
    return metrics


def score_auxiliary(cfg: KTOStage, ctx: StageContext, train: KTOSet, plain: dict[str, list[str]],
                    held_out: PairSet | None, eval_texts: dict[str, list[str]] | None, trainer: ActorGroup,
                    pad_id: int) -> tuple[Any, dict[str, float]]:
    """Phase ``score_auxiliary`` (UPO on KTO): every training completion scored under each auxiliary
    reward (cached) and weighted against its baseline: the mean over the rows that share its prompt,
    or with ``upo.baseline: value`` a value of the prompt (fitted on the ``trainer``'s starting
    policy); the held-out pairs' rewards for the tie accuracy. Returns the scorer of held-out
    generations and the data's statistics."""
    scorer = auxiliary.spawn_scorer(cfg, ctx)
    rewards = auxiliary.response_rewards(cfg, ctx, scorer, plain["prompt"], plain["completion"])
    train.aux_rewards = rewards.float()
    value: dict[str, float] = {}
    if cfg.upo.baseline == "value":
        train.aux_weights, value = auxiliary.value_weights(cfg, rewards, [r.prompt for r in train.rows], trainer,
                                                           PolicyTrainer.evaluate, pad_id)
    else:
        train.aux_weights = auxiliary.weights(cfg, rewards, auxiliary.prompt_groups(plain["prompt"]))
    if held_out is not None and eval_texts is not None:
        rows = {k: eval_texts[f"{k}_plain"] for k in PAIR_FIELDS}
        held_out.aux = auxiliary.build_term(cfg, ctx, scorer, rows, auxiliary.EVAL_CACHE_FILE)
    metrics = auxiliary.data_metrics(auxiliary.names(cfg), rewards, train.aux_weights)
    return auxiliary.generation_scorer(cfg, scorer), metrics | value


def run(cfg: KTOStage, ctx: StageContext) -> dict[str, str]:
    policy_path, ref_path, tokenizer, pad_id = policy_inputs(cfg, ctx)
    d, s = cfg.data, cfg.schedule
    train, plain = load_rows(ctx.input("data.train"), tokenizer, d.columns, d.max_length, s.seed)
    sets: dict[str, Any] = {"train": train.rows}
    eval_path = ctx.input("data.eval")
    pair_columns = {k: v for k, v in d.columns.items() if k in PAIR_FIELDS}
    eval_texts = load_pair_texts(eval_path, tokenizer, pair_columns, d.eval_pairs) if eval_path else None
    if eval_texts is not None:
        sets["eval"] = load_pairs(eval_path, tokenizer, d.max_length, texts=eval_texts)
    sampler = EpochSampler(len(train.rows), s.examples_per_step, s.seed)

    def start_trainer() -> ActorGroup:
        return spawn_trainer(ctx, role="policy_trainer", model_path=policy_path, trainer=cfg.trainer, optim=cfg.optim,
                             steps=s.steps, per_step=s.examples_per_step, per_microbatch=s.examples_per_microbatch,
                             seed=s.seed)

    shared = start_trainer() if reference_from_trainer(cfg) else None
    refs = reference_logps(cfg, ctx, ref_path, sets, pad_id, shared)
    train.ref, train.ref_kl = refs["train"].ref_chosen, refs["train"].ref_rejected
    held_out = refs.get("eval")
    start_metrics = {"data/examples": float(len(train.rows)), "data/desirable_fraction": float(train.desirable.mean())}
    trainer = shared or start_trainer()
    extra = None
    if cfg.auxiliary:
        with ctx.timed("score_auxiliary", start_metrics):
            extra, data_metrics = score_auxiliary(cfg, ctx, train, plain, held_out, eval_texts, trainer, pad_id)
        start_metrics |= data_metrics
    gen = cfg.generation
    prompts = held_out_prompts(eval_texts, sets["eval"]) if held_out and eval_texts and gen.enabled else []
    checker = FunctionReward(gen.checker) if prompts and gen.checker else None
    train_loop(
        ctx, trainer, steps=s.steps, eval_every=s.eval_every, unit="examples",
        batches_per_epoch=sampler.batches_per_epoch, make_batch=lambda step: train.batch(sampler.indices(step), pad_id),
        loss_fn=kto_loss_of(cfg), start_metrics=start_metrics,
        evaluate=(lambda: evaluate(cfg, ctx, trainer, held_out, pad_id, prompts, tokenizer, checker, extra))
        if held_out else None,
    )
    out_dir = str(ctx.stage_dir / "model")
    trainer.broadcast(PolicyTrainer.save_hf, out_dir)
    return {"model": out_dir}


STAGE = StageKind(KTOStage, run)
