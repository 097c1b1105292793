"""Stage ``init_model`` (and ``rlhf init-model``): a small, randomly initialised model of a chosen
architecture with a byte-level BPE tokenizer trained on the user's own data files: try the product
on real text without a model hub.

The tokenizer is trained (``tokenizers``, deterministic) on every text of ``tokenizer.train_files``
(string columns and conversations' message contents), with ChatML's special tokens and chat
template: ``<|im_end|>`` is EOS (a generation stops there), ``<|endoftext|>`` pads, and there is no
BOS. The model is ``pipelines.tasks.architectures``' config of ``architecture`` at ``size``, with
``max_position_embeddings`` positions; weights are written as safetensors, atomically.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from actors.fsutil import atomic_directory
from pipelines.data import sources
from pipelines.stages.base import Frozen, StageBase, StageKind

if TYPE_CHECKING:
    from orchestrator.runtime.context import StageContext


class TokenizerTraining(Frozen):
    """A byte-level BPE tokenizer trained on the user's files, with a ChatML template."""

    train_files: tuple[str, ...] = Field(min_length=1, description="data files whose texts train it (any source "
                                         "a stage reads: .parquet, .jsonl(.gz), a save_to_disk folder, hub:...)")
    vocab_size: int = Field(4096, ge=300, le=262144, description="tokens, special ones included (a multiple of 64 "
                            "is best)")


class InitModelStage(StageBase):
    """A small random model of a chosen architecture, with a BPE tokenizer trained on your data."""

    kind: Literal["init_model"]
    architecture: str = Field("llama", description="llama, qwen2, qwen3, mistral, gemma2, gemma3, phi3, gpt_neox, "
                              "gpt2 (pipelines/tasks/architectures.py)")
    size: Literal["tiny", "mini", "small", "85m"] = Field("tiny", description="~0.5M, ~1M, ~3M, ~85M parameters "
                                                          "(tiny_model.SIZES)")
    max_position_embeddings: int = Field(1024, ge=16, le=131072)
    tokenizer: TokenizerTraining
    seed: int = 0

    TRAINS: ClassVar[bool] = False  # freshly initialised: not a version in the model registry
    OUTPUTS: ClassVar[dict[str, str]] = {"model": "model"}

    @field_validator("architecture")
    @classmethod
    def _known(cls, value: str) -> str:
        from pipelines.tasks.architectures import ARCHITECTURES

        if value not in ARCHITECTURES:
            raise ValueError(f"{value!r} is not one of {sorted(ARCHITECTURES)}")
        return value

    def built_positions(self) -> int | None:
        return self.max_position_embeddings


def init_model(out_dir: str, *, architecture: str, size: str, positions: int, train_files: tuple[str, ...],
               vocab_size: int, seed: int) -> dict[str, Any]:
    """Train the tokenizer on ``train_files``, build the model, write both to ``out_dir`` (atomically)
    with ``init_model.json`` (what was built); returns that summary."""
    from pipelines.tasks.architectures import build_model
    from pipelines.tasks.tiny_model import build_bpe_tokenizer

    for path in train_files:
        sources.check(path, "tokenizer.train_files")
    corpus = (text for path in train_files for text in sources.texts(path))
    tokenizer = build_bpe_tokenizer(corpus, vocab_size=vocab_size, model_max_length=positions)
    with atomic_directory(out_dir) as tmp:
        summary = build_model(tmp, architecture=architecture, size=size, positions=positions, tokenizer=tokenizer,
                              seed=seed)
        summary |= {"tokenizer": {"kind": "byte-level BPE", "vocab": len(tokenizer), "train_files": list(train_files),
                                  "eos": tokenizer.eos_token, "pad": tokenizer.pad_token, "chat_template": "ChatML"}}
        (tmp / "init_model.json").write_text(json.dumps(summary, indent=1))
    return summary


def run(cfg: InitModelStage, ctx: StageContext) -> dict[str, str]:
    out = str(ctx.stage_dir / "model")
    summary = init_model(out, architecture=cfg.architecture, size=cfg.size, positions=cfg.max_position_embeddings,
                         train_files=cfg.tokenizer.train_files, vocab_size=cfg.tokenizer.vocab_size, seed=cfg.seed)
    ctx.log.metrics({"model/parameters": float(summary["parameters"]),
                     "model/vocab": float(summary["tokenizer"]["vocab"])}, step=0)
    return {"model": out}


STAGE = StageKind(InitModelStage, run)
