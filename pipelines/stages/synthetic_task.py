"""Stage ``synthetic_task``: build the tiny model and the arithmetic task's datasets locally."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from actors.fsutil import atomic_directory
from pipelines.stages.base import StageBase, StageKind
from pipelines.tasks import arithmetic, worked_sums

if TYPE_CHECKING:
    from orchestrator.runtime.context import StageContext


class SyntheticTaskStage(StageBase):
    """Build a tiny Llama model + char tokenizer and the arithmetic task's datasets, locally."""

    kind: Literal["synthetic_task"]
    model_size: Literal["tiny", "mini", "small", "85m"] = "tiny"
    max_operand: int = Field(99, ge=1, le=9999)
    terms: int = Field(
        2, ge=2, le=40, description="terms per problem: 2 is the short task (a+b=, the bare sum); more is the "
        "long-response task, the running sums written out (pipelines.tasks.worked_sums: ~10 tokens per term, "
        "reward pipelines.tasks.worked_sums:reward)")
    num_sft: int = Field(4000, ge=1)
    num_pairs: int = Field(4000, ge=1)
    num_prompts: int = Field(1000, ge=1)
    num_eval: int = Field(256, ge=1)
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    verbose_fraction: float = Field(
        0.0, ge=0, le=1, description="share of SFT responses and of each pair side written 'sum is N' (a style the "
        "preferences do not encode; the UPO example's designer objective asks for it)")
    seed: int = 0
    tokenizer: Literal["char", "bpe"] = Field(
        "char", description="char: one token per character; bpe: byte-level BPE trained on the task, ChatML template")
    data_format: Literal["text", "conversational", "implicit_prompt"] = Field(
        "text", description="the datasets' format: string columns, {role, content} conversations, or "
        "conversations with the pairs' prompt implicit (docs/data.md)")
    file_type: Literal["parquet", "jsonl"] = "parquet"

    @model_validator(mode="after")
    def _one_style_for_worked_sums(self) -> SyntheticTaskStage:
        if self.terms > 2 and self.verbose_fraction:
            raise ValueError("verbose_fraction: the worked sums (terms > 2) have one answer style")
        return self

    TRAINS: ClassVar[bool] = False  # its model is freshly initialised: not a version in the model registry

    def built_positions(self) -> int | None:
        # build_tiny_model's default; the worked sums need room for their answers
        return 128 if self.terms == 2 else max(128, worked_sums.positions_needed(self.terms, self.max_operand))
    OUTPUTS: ClassVar[dict[str, str]] = {
        "model": "model",
        "sft_train": "sft",
        "sft_eval": "sft",
        "pairs_train": "pairs",
        "pairs_eval": "pairs",
        "prompts_train": "prompts",
        "prompts_eval": "prompts",
        "judge_train": "sft",  # is this answer right? yes/no rows (the arithmetic task: terms 2)
        "judge_eval": "sft",
    }


def run(cfg: SyntheticTaskStage, ctx: StageContext) -> dict[str, str]:
    model_dir = ctx.stage_dir / "model"
    with atomic_directory(model_dir) as tmp:
        from pipelines.tasks.tiny_model import build_tiny_model  # transformers: ~5 s to import

        build_tiny_model(tmp, size=cfg.model_size, seed=cfg.seed, tokenizer=cfg.tokenizer,
                         max_position_embeddings=cfg.built_positions() or 128)
    with atomic_directory(ctx.stage_dir / "data") as tmp:
        if cfg.terms > 2:
            worked_sums.write_datasets(
                tmp, terms=cfg.terms, max_operand=cfg.max_operand, num_sft=cfg.num_sft, num_pairs=cfg.num_pairs,
                num_prompts=cfg.num_prompts, num_eval=cfg.num_eval, seed=cfg.seed, data_format=cfg.data_format,
                file_type=cfg.file_type)
        else:
            arithmetic.write_datasets(
                tmp, max_operand=cfg.max_operand, num_sft=cfg.num_sft, num_pairs=cfg.num_pairs,
                num_prompts=cfg.num_prompts, num_eval=cfg.num_eval, eval_fraction=cfg.eval_fraction, seed=cfg.seed,
                verbose_fraction=cfg.verbose_fraction, data_format=cfg.data_format, file_type=cfg.file_type,
            )
    data_dir = ctx.stage_dir / "data"
    outputs = {"model": str(model_dir)}
    for name in cfg.OUTPUTS:
        path = data_dir / f"{name}.{cfg.file_type}"
        if name != "model" and path.is_file():  # the worked sums write no judge rows
            outputs[name] = str(path)
    return outputs


STAGE = StageKind(SyntheticTaskStage, run)
