"""Stage ``synthetic_task``: build the tiny model and the arithmetic task's datasets locally."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from actors.fsutil import atomic_directory
from pipelines.stages.base import StageBase, StageKind
from pipelines.tasks import arithmetic

if TYPE_CHECKING:
    from orchestrator.runtime.context import StageContext


class SyntheticTaskStage(StageBase):
    """Build a tiny Llama model + char tokenizer and the arithmetic task's datasets, locally."""

    kind: Literal["synthetic_task"]
    model_size: Literal["tiny", "mini", "small", "85m"] = "tiny"
    max_operand: int = Field(99, ge=1, le=9999)
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

    TRAINS: ClassVar[bool] = False  # its model is freshly initialised: not a version in the model registry

    def built_positions(self) -> int | None:
        return 128  # build_tiny_model's default
    OUTPUTS: ClassVar[dict[str, str]] = {
        "model": "model",
        "sft_train": "sft",
        "sft_eval": "sft",
        "pairs_train": "pairs",
        "pairs_eval": "pairs",
        "prompts_train": "prompts",
        "prompts_eval": "prompts",
    }


def run(cfg: SyntheticTaskStage, ctx: StageContext) -> dict[str, str]:
    model_dir = ctx.stage_dir / "model"
    with atomic_directory(model_dir) as tmp:
        from pipelines.tasks.tiny_model import build_tiny_model  # transformers: ~5 s to import

        build_tiny_model(tmp, size=cfg.model_size, seed=cfg.seed, tokenizer=cfg.tokenizer)
    with atomic_directory(ctx.stage_dir / "data") as tmp:
        arithmetic.write_datasets(
            tmp, max_operand=cfg.max_operand, num_sft=cfg.num_sft, num_pairs=cfg.num_pairs,
            num_prompts=cfg.num_prompts, num_eval=cfg.num_eval, eval_fraction=cfg.eval_fraction, seed=cfg.seed,
            verbose_fraction=cfg.verbose_fraction, data_format=cfg.data_format, file_type=cfg.file_type,
        )
    data_dir = ctx.stage_dir / "data"
    outputs = {"model": str(model_dir)}
    for name in cfg.OUTPUTS:
        if name != "model":
            outputs[name] = str(data_dir / f"{name}.{cfg.file_type}")
    return outputs


STAGE = StageKind(SyntheticTaskStage, run)
