"""Stage ``synthetic_task``: build the tiny model and the arithmetic task's datasets locally."""

from __future__ import annotations

from typing import TYPE_CHECKING

from actors.fsutil import atomic_directory
from pipelines.tasks import arithmetic
from pipelines.tasks.tiny_model import build_tiny_model

if TYPE_CHECKING:
    from orchestrator.context import StageContext
    from orchestrator.stage_config import SyntheticTaskStage


def run(cfg: SyntheticTaskStage, ctx: StageContext) -> dict[str, str]:
    model_dir = ctx.stage_dir / "model"
    with atomic_directory(model_dir) as tmp:
        build_tiny_model(tmp, size=cfg.model_size, seed=cfg.seed)
    with atomic_directory(ctx.stage_dir / "data") as tmp:
        arithmetic.write_datasets(
            tmp, max_operand=cfg.max_operand, num_sft=cfg.num_sft, num_pairs=cfg.num_pairs,
            num_prompts=cfg.num_prompts, num_eval=cfg.num_eval, eval_fraction=cfg.eval_fraction, seed=cfg.seed,
            verbose_fraction=cfg.verbose_fraction,
        )
    data_dir = ctx.stage_dir / "data"
    outputs = {"model": str(model_dir)}
    for name in cfg.OUTPUTS:
        if name != "model":
            outputs[name] = str(data_dir / f"{name}.parquet")
    return outputs
