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
from pipelines.data.batches import KTOBatch
from pipelines.data.formats import (
    PAIR_FIELDS,
    UNPAIRED_FIELDS,
    plain_completion,
    plain_prompt,
    read_preferences,
    render_completion,
    render_prompt,
)
from pipelines.data.lengths import LengthTally, report_lengths
from pipelines.data.tokens import (
    EpochSampler,
    TokenizedPair,
    collate_pairs,
    count_unknown,
    encode_completions,
    starts_with_bos,
)
from pipelines.errors import DataError
from pipelines.losses import KTOLoss
from pipelines.stages.auxiliary import EVAL_CACHE_FILE, data_metrics, prompt_groups, value_weights
from pipelines.stages.base import (
    COLUMNS_DOC,
    Frozen,
    Metric,
    PathOrRef,
    ReadsFromStage,
    StageKind,
    check_batches,
    trainer_numbers,
)
from pipelines.stages.config import ExampleScheduleConfig, LengthFields
from pipelines.stages.pairs import PairSet, kept_texts, load_pair_texts, load_pairs
from pipelines.stages.preference import PreferenceRun, PreferenceStage, held_out_prompts
from pipelines.stages.training import Extra

if TYPE_CHECKING:
    from orchestrator.runtime.context import StageContext


class KTOConfig(Frozen):
    """KTO's loss; see pipelines.algorithms.kto.kto_loss. The paper advises weights with
    λ_D·n_D / (λ_U·n_U) in [1, 4/3] (n: desirable and undesirable rows; ``data/desirable_fraction``)."""

    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0, description="λ_D")
    undesirable_weight: float = Field(1.0, gt=0, description="λ_U")


class UnpairedDataConfig(LengthFields, ReadsFromStage):
    """Training rows: unpaired (prompt, completion, label) or preference pairs (split into a desirable
    and an undesirable row); held-out data: preference pairs. Texts or conversations; see docs/data.md."""

    train: PathOrRef
    eval: PathOrRef | None = Field(None, description="held-out preference pairs (prompt, chosen, rejected)")
    columns: dict[str, str] = Field({}, description=COLUMNS_DOC + "; unpaired: {completion: answer, label: liked}")
    eval_pairs: int | None = Field(None, ge=1, description="cap on held-out pairs evaluated")


class KTOStage(PreferenceStage):
    """KTO on unpaired (or split paired) preference data; UPO on KTO with ``auxiliary`` rewards."""

    kind: Literal["kto"]
    data: UnpairedDataConfig
    kto: KTOConfig = KTOConfig()
    schedule: ExampleScheduleConfig = ExampleScheduleConfig()

    INPUTS: ClassVar[dict[str, tuple[str, str]]] = {
        "policy": ("model", "model"),
        "reference": ("model", "model"),
        "data.train": ("preferences", "pairs_train"),
        "data.eval": ("pairs", "pairs_eval"),
    }
    HEADLINE: ClassVar[tuple[Metric, ...]] = (Metric("loss", "loss"), Metric("kto/kl", "kl"),
                                               *PreferenceStage.HEADLINE[2:])

    def numbers(self) -> dict[str, float | str]:
        s, t = self.schedule, self.trainer
        return trainer_numbers("examples", s.examples_per_step, s.examples_per_microbatch, s.steps, t.num_workers,
                               t.zero_stage, 2) | {"reference_logprobs": self.reference_note()}

    @model_validator(mode="after")
    def _consistent(self) -> KTOStage:
        s = self.schedule
        check_batches(s.examples_per_step, s.examples_per_microbatch, self.trainer.num_workers, "examples")
        unknown = sorted(set(self.data.columns) - set(UNPAIRED_FIELDS) - set(PAIR_FIELDS))
        if unknown:
            raise ValueError(f"data.columns: unknown field(s) {unknown}; KTO reads {list(UNPAIRED_FIELDS)} or "
                             f"{list(PAIR_FIELDS)}")
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
        aux = (None, None)
        if self.aux_weights is not None and self.aux_rewards is not None:
            aux = (self.aux_rewards[idx], self.aux_weights[idx])
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


def load_rows(path: str, tokenizer: Any, columns: dict[str, str], lengths: LengthTally, seed: int
              ) -> tuple[KTOSet, dict[str, list[str]]]:
    """Read, render and tokenize the training rows (``formats.read_preferences``) under the length
    policy of ``lengths`` (finished here); their plain texts (what function rewards see: ``prompt``,
    ``completion``) come back beside them.

    Raises:
        DataError: fewer than 2 rows kept, or rows over the limits under ``truncation: error``.
    """
    read = read_preferences(path, columns)
    where = [f"{path}: row {r + 1}" for r in read.file_rows]
    prompts, completions = encode_completions(
        tokenizer, [render_prompt(tokenizer, p, w) for p, w in zip(read.prompt, where, strict=True)],
        [render_completion(tokenizer, p, c, w) for p, c, w in zip(read.prompt, read.completion, where, strict=True)])
    lengths.unknown += count_unknown(tokenizer, prompts, completions)
    keep: list[int] = []
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        if (cut := lengths.fit(read.file_rows[i], len(p), (len(c),), keep_first=starts_with_bos(tokenizer, p))):
            keep.append(i)
            prompts[i], completions[i] = cut.prompt(p), c[: cut.completion]
    lengths.finish()
    if len(keep) < 2:
        raise DataError(f"{path}: KTO needs at least 2 rows (each row's reference point uses another row's "
                        f"completion), found {len(keep)}")
    prompts, completions = [prompts[i] for i in keep], [completions[i] for i in keep]
    room = lengths.policy.max_length
    partner = mismatched(len(keep), seed)
    rows = [TokenizedPair(p, c, completions[partner[i]][: max(1, room - len(p))], read.file_rows[keep[i]])
            for i, (p, c) in enumerate(zip(prompts, completions, strict=True))]
    plain = {"prompt": [plain_prompt(read.prompt[i]) for i in keep],
             "completion": [plain_completion(read.completion[i]) for i in keep]}
    return KTOSet(rows, torch.tensor([read.label[i] for i in keep], dtype=torch.float32)), plain


def kto_loss_of(cfg: KTOStage) -> KTOLoss:
    k, objective = cfg.kto, cfg.auxiliary_objective()
    upo = (0.0, (), False)
    if objective is not None:
        upo = (objective.upo.coef, objective.names, objective.upo.responses == "preferred")
    return KTOLoss(k.beta, k.desirable_weight, k.undesirable_weight, *upo)


def judge_of(cfg: KTOStage, held_out: PairSet):  # type: ignore[no-untyped-def]
    """Held-out pairs: the implicit reward β·(log π − log π_ref) of both sides (``eval/rewards/*``,
    accuracy = chosen above rejected) and the policy's own ranking."""
    assert held_out.ref_chosen is not None and held_out.ref_rejected is not None
    beta = cfg.kto.beta

    def judge(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        cr, rr = beta * (chosen - held_out.ref_chosen), beta * (rejected - held_out.ref_rejected)
        metrics = {f"eval/{k}": float(v) for k, v in preference_metrics(cr, rr, chosen, rejected).items()}
        return metrics, cr, rr

    return judge


def score_auxiliary(run: PreferenceRun, train: KTOSet, plain: dict[str, list[str]], held_out: PairSet | None,
                    eval_texts: dict[str, list[str]] | None) -> tuple[Extra, dict[str, float]]:
    """Phase ``score_auxiliary`` (UPO on KTO): every training completion scored under each auxiliary
    reward (cached) and weighted against its baseline: the mean over the rows that share its prompt,
    or with ``upo.baseline: value`` a value of the prompt (fitted on the trainer's starting policy);
    the held-out pairs' rewards for the tie accuracy. Returns the scorer of held-out generations and
    the data's statistics."""
    scorer = run.scorer()
    objective = scorer.objective
    rewards = scorer.responses(plain["prompt"], plain["completion"])
    train.aux_rewards = rewards.float()
    value: dict[str, float] = {}
    if objective.upo.baseline == "value":
        train.aux_weights, value = value_weights(objective, rewards, [r.prompt for r in train.rows], run.trainer,
                                                 PolicyTrainer.evaluate, run.pad_id)
    else:
        train.aux_weights = objective.weights(rewards, prompt_groups(plain["prompt"]))
    if held_out is not None and eval_texts is not None:
        held_out.aux = scorer.term({k: eval_texts[f"{k}_plain"] for k in PAIR_FIELDS}, EVAL_CACHE_FILE)
    return scorer.of_generations, data_metrics(objective.names, rewards, train.aux_weights) | value


def run(cfg: KTOStage, ctx: StageContext) -> dict[str, str]:
    with PreferenceRun(cfg, ctx) as run:
        return _train(cfg, ctx, run)


def _train(cfg: KTOStage, ctx: StageContext, run: PreferenceRun) -> dict[str, str]:
    d, s = cfg.data, cfg.schedule
    train_path = ctx.input("data.train")
    train, plain = load_rows(train_path, run.tokenizer, d.columns, lengths := d.lengths(train_path), s.seed)
    sets: dict[str, Any] = {"train": train.rows}
    eval_path = ctx.input("data.eval")
    pair_columns = {k: v for k, v in d.columns.items() if k in PAIR_FIELDS}
    tallies, eval_texts = {"train": lengths}, None
    if eval_path:
        read = load_pair_texts(eval_path, run.tokenizer, pair_columns, d.eval_pairs)
        tallies["eval"] = d.lengths(eval_path)
        sets["eval"] = load_pairs(eval_path, run.tokenizer, tallies["eval"], texts=read)
        eval_texts = kept_texts(read, [p.row for p in sets["eval"]])
    sampler = EpochSampler(len(train.rows), s.examples_per_step, s.seed)
    refs = run.reference(sets)
    train.ref, train.ref_kl = refs["train"].ref_chosen, refs["train"].ref_rejected
    held_out = refs.get("eval")
    ctx.log.params(report_lengths(tallies))
    start_metrics = {"data/examples": float(len(train.rows)), "data/desirable_fraction": float(train.desirable.mean())}
    run.start_trainer()
    extra = None
    if cfg.auxiliary:
        with ctx.log.timed("score_auxiliary", start_metrics):
            extra, aux_metrics = score_auxiliary(run, train, plain, held_out, eval_texts)
        start_metrics |= aux_metrics
    prompts = held_out_prompts(eval_texts, sets["eval"]) if held_out and eval_texts and cfg.generation.enabled else []
    return run.train(batches_per_epoch=sampler.batches_per_epoch,
                     make_batch=lambda step: train.batch(sampler.indices(step), run.pad_id), loss_fn=kto_loss_of(cfg),
                     start_metrics=start_metrics,
                     evaluate=(lambda: run.evaluate(held_out, judge_of(cfg, held_out), prompts, extra))
                     if held_out else None)


STAGE = StageKind(KTOStage, run)
