"""Stage ``agent_task``: a shipped multi-turn task's datasets and a tiny model for it, built locally.

``task: calculator`` (``a * b + c`` with ``add`` / ``multiply`` tools; ``pipelines.tasks.calculator``)
or ``task: guess`` (guess a number from 1 to 8 from higher/lower replies; ``pipelines.tasks.guess``).
The demonstrations (``sft_train`` / ``sft_eval``) are played by a scripted expert through the real
environment; the tasks (``prompts_train`` / ``prompts_eval``) are what an online stage's
``environment`` resets on. The model is a tiny Llama with a byte-level BPE tokenizer trained on the
demonstrations and ChatML's template with tool roles (``tiny_model.CHATML_TEMPLATE``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from actors.fsutil import atomic_directory
from pipelines.data import sources
from pipelines.stages.base import StageBase, StageKind

if TYPE_CHECKING:
    from orchestrator.runtime.context import StageContext

# The role names the template writes (a tokenizer trained only on message contents splits them).
ROLE_WORDS = "<|im_start|>system\nTools:<|im_end|>\n<|im_start|>user\n<|im_start|>assistant\n<|im_start|>tool\n"


class AgentTaskStage(StageBase):
    """Demonstrations and tasks of a shipped multi-turn task, and a tiny model with a BPE tokenizer."""

    kind: Literal["agent_task"]
    task: Literal["calculator", "guess"]
    model_size: Literal["tiny", "mini", "small", "85m"] = "tiny"
    max_position_embeddings: int = Field(512, ge=64, le=8192)
    vocab_size: int = Field(512, ge=300, le=65536)
    num_sft: int = Field(2000, ge=1)
    num_tasks: int = Field(1000, ge=1)
    num_eval: int = Field(100, ge=1)
    seed: int = 0

    TRAINS: ClassVar[bool] = False  # a freshly initialised model
    OUTPUTS: ClassVar[dict[str, str]] = {"model": "model", "sft_train": "sft", "sft_eval": "sft",
                                         "prompts_train": "prompts", "prompts_eval": "prompts"}

    def built_positions(self) -> int | None:
        return self.max_position_embeddings


def run(cfg: AgentTaskStage, ctx: StageContext) -> dict[str, str]:
    from pipelines.tasks import calculator, guess

    writer = {"calculator": calculator.write_datasets, "guess": guess.write_datasets}[cfg.task]
    with atomic_directory(ctx.stage_dir / "data") as tmp:
        written = writer(tmp, num_sft=cfg.num_sft, num_tasks=cfg.num_tasks, num_eval=cfg.num_eval, seed=cfg.seed)
    data_dir = ctx.stage_dir / "data"
    outputs = {name: str(data_dir / Path(path).name) for name, path in written.items()}
    model_dir = ctx.stage_dir / "model"
    with atomic_directory(model_dir) as tmp:
        from pipelines.tasks.architectures import build_model
        from pipelines.tasks.tiny_model import build_bpe_tokenizer

        corpus = [ROLE_WORDS, *sources.texts(outputs["sft_train"])]
        if cfg.task == "calculator":
            corpus.append(json.dumps(calculator.tool_schemas()))
        tokenizer = build_bpe_tokenizer(corpus, vocab_size=cfg.vocab_size, model_max_length=cfg.max_position_embeddings)
        summary = build_model(tmp, architecture="llama", size=cfg.model_size, positions=cfg.max_position_embeddings,
                              tokenizer=tokenizer, seed=cfg.seed)
    ctx.log.metrics({"model/parameters": float(summary["parameters"]), "model/vocab": float(len(tokenizer))}, step=0)
    return {"model": str(model_dir)} | outputs


STAGE = StageKind(AgentTaskStage, run)
