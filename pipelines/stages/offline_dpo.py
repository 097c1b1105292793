"""Stage ``offline_dpo``: DPO on a fixed dataset of preference pairs (the preference family's phases,
``preference.PreferenceRun``: ``load_data`` → ``ref_logprobs`` → [``score_auxiliary``] → ``update`` ×
steps with ``eval`` → ``save``). The training pairs are tokenized batch by batch into a memory-mapped
store (memory flat in the file's length); the held-out pairs (at most ``eval_pairs``) and, for UPO's
designer rewards, the training texts are held as texts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import model_validator

from actors.policy_trainer import PolicyTrainer
from pipelines.data.formats import PAIR_FIELDS
from pipelines.data.lengths import report_lengths
from pipelines.data.tokens import EpochSampler, write_pair_store
from pipelines.stages.auxiliary import CACHE_FILE, EVAL_CACHE_FILE, with_value_baseline
from pipelines.stages.base import StageKind, check_batches, trainer_numbers
from pipelines.stages.config import DPOFields, PairDataConfig, PairScheduleConfig
from pipelines.stages.pairs import (
    PairSet,
    dpo_loss_of,
    held_out_metrics,
    kept_texts,
    load_pair_texts,
    load_pairs,
    training_loss,
)
from pipelines.stages.preference import PreferenceRun, PreferenceStage, held_out_prompts
from pipelines.stages.training import Extra

if TYPE_CHECKING:
    from orchestrator.runtime.context import StageContext


class OfflineDPOStage(DPOFields, PreferenceStage):
    """Offline DPO on a fixed dataset of preference pairs."""

    kind: Literal["offline_dpo"]
    data: PairDataConfig
    schedule: PairScheduleConfig = PairScheduleConfig()

    INPUTS: ClassVar[dict[str, tuple[str, str]]] = {
        "policy": ("model", "model"),
        "reference": ("model", "model"),
        "data.train": ("pairs", "pairs_train"),
        "data.eval": ("pairs", "pairs_eval"),
    }

    def numbers(self) -> dict[str, float | str]:
        s, t = self.schedule, self.trainer
        return trainer_numbers("pairs", s.pairs_per_step, s.pairs_per_microbatch, s.steps, t.num_workers,
                               t.zero_stage, 2) | {"reference_logprobs": self.reference_note()}

    @model_validator(mode="after")
    def _batches_divide(self) -> OfflineDPOStage:
        s = self.schedule
        check_batches(s.pairs_per_step, s.pairs_per_microbatch, self.trainer.num_workers, "pairs")
        return self


def score_auxiliary(run: PreferenceRun, data: dict[str, PairSet], texts: dict[str, dict[str, Any]]
                    ) -> tuple[Extra, dict[str, float]]:
    """Phase ``score_auxiliary`` (UPO): the ``reward`` group scores both sides of every training and
    held-out pair under each auxiliary reward (cached); the pair sets get their rewards and weights
    (``upo.baseline: value``: against a value of the prompt fitted on the starting policy). Returns
    the scorer of held-out generations (it keeps the group for the rest of the stage) and the data's
    statistics."""
    scorer = run.scorer()
    for name, pair_set in data.items():
        plain = {k: texts[name][f"{k}_plain"] for k in PAIR_FIELDS}  # what function rewards read
        pair_set.aux = scorer.term(plain, CACHE_FILE if name == "train" else EVAL_CACHE_FILE)
    train = data["train"]
    assert train.aux is not None
    value = {}
    if scorer.objective.upo.baseline == "value":
        value = with_value_baseline(scorer.objective, train.aux, [p.prompt for p in train.pairs[:]], run.trainer,
                                    PolicyTrainer.evaluate, run.pad_id)
    return scorer.of_generations, train.aux.data_metrics() | value


def run(cfg: OfflineDPOStage, ctx: StageContext) -> dict[str, str]:
    with PreferenceRun(cfg, ctx) as run:
        return _train(cfg, ctx, run)


def _train(cfg: OfflineDPOStage, ctx: StageContext, run: PreferenceRun) -> dict[str, str]:
    paths, d, s = {"train": ctx.input("data.train"), "eval": ctx.input("data.eval")}, cfg.data, cfg.schedule
    lengths = {name: d.lengths(path) for name, path in paths.items() if path}
    sets: dict[str, Any] = {"train": write_pair_store(paths["train"], d.columns, run.tokenizer,
                                                      ctx.stage_dir / "pairs_train.arrow", lengths=lengths["train"])}
    texts = {}
    if cfg.auxiliary:
        texts["train"] = kept_texts(load_pair_texts(paths["train"], run.tokenizer, d.columns), sets["train"].rows())
    if paths["eval"]:
        read = load_pair_texts(paths["eval"], run.tokenizer, d.columns, d.eval_pairs)
        sets["eval"] = load_pairs(paths["eval"], run.tokenizer, lengths["eval"], texts=read)
        texts["eval"] = kept_texts(read, [p.row for p in sets["eval"]])
    ctx.log.params(report_lengths(lengths))
    sampler = EpochSampler(len(sets["train"]), s.pairs_per_step, s.seed)
    data = run.reference(sets)
    run.start_trainer()  # after the reference log-probs, when a reference group computed them
    extra, start_metrics = None, {}
    if cfg.auxiliary:  # UPO: the designer's rewards of every response, scored once
        with ctx.log.timed("score_auxiliary", start_metrics):
            extra, aux_metrics = score_auxiliary(run, data, texts)
        start_metrics |= aux_metrics
    held_out = data.get("eval")
    prompts = held_out_prompts(texts["eval"], sets["eval"]) if held_out and cfg.generation.enabled else []
    loss = dpo_loss_of(cfg.dpo)

    def judge(chosen, rejected):  # type: ignore[no-untyped-def]
        return held_out_metrics(loss, held_out, chosen, rejected)

    return run.train(batches_per_epoch=sampler.batches_per_epoch,
                     make_batch=lambda step: data["train"].batch(sampler.indices(step), run.pad_id),
                     loss_fn=training_loss(cfg.dpo, cfg.auxiliary_objective()), start_metrics=start_metrics,
                     evaluate=(lambda: run.evaluate(held_out, judge, prompts, extra)) if held_out else None)


STAGE = StageKind(OfflineDPOStage, run)
