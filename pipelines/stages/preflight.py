"""A pipeline's checks before any actor starts (``rlhf run`` and ``rlhf validate``).

* every stage's literal inputs (``registry.preflight_inputs``): data files read through, models located;
* the longest sequence a stage feeds its model (``StageBase.longest_sequence``: ``data.max_length``,
  or prompt + new tokens) against the positions in that model's ``config.json``: the model a stage
  reads is its ``MODEL_FIELD``, followed through ``from:`` references to the first stage that names
  a local directory (a hub id or a model built by an earlier stage is checked when that stage runs);
* with ``lengths`` (``rlhf validate``): each literal data file tokenized by that model's tokenizer
  under the stage's length policy (``data.truncation``), as the stage will: rows over the limits
  are an error under ``error``, else counted, one line per file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipelines.data.formats import PAIR_FIELDS, PairRows, render_pairs, stream_pairs
from pipelines.data.lengths import LengthTally
from pipelines.data.tokens import load_tokenizer, model_positions, tokenize_pairs
from pipelines.errors import ConfigError, DataError
from pipelines.stages import kto, online_rollout, sft
from pipelines.stages.base import StageBase, StageRef
from pipelines.stages.config import LengthFields, PromptLengthFields
from pipelines.stages.registry import preflight_inputs


def preflight_pipeline(stages: Sequence[StageBase], *, lengths: bool = False) -> list[str]:
    """Run the checks; return what the length pass found (one line per data file), with ``lengths``."""
    by_name = {s.name: s for s in stages}
    lines: list[str] = []
    for stage in stages:
        preflight_inputs(stage)
        model = model_source(stage, by_name)
        if model is None:
            continue
        check_positions(stage, model)
        if isinstance(model, str) and Path(model).is_dir():
            stage.check_model(model)
        if lengths and isinstance(model, str):
            lines += check_lengths(stage, model)
    return lines


def model_source(stage: StageBase, by_name: dict[str, StageBase]) -> str | StageBase | None:
    """The local path or hub id of the model whose tokenizer and positions the stage's data meets,
    followed through ``from:``; or the earlier stage that builds that model; None where the stage
    reads no model."""
    field, seen = stage.MODEL_FIELD, set()
    while field is not None:
        value = stage.field(field)
        if isinstance(value, str):
            return value
        if not isinstance(value, StageRef) or value.from_ in seen or value.from_ not in by_name:
            return None
        seen.add(value.from_)
        stage = by_name[value.from_]
        field = stage.MODEL_FIELD
    return stage if stage.built_positions() is not None else None


def check_positions(stage: StageBase, model: str | StageBase) -> None:
    bound = stage.longest_sequence()
    positions = model_positions(model) if isinstance(model, str) else model.built_positions()
    if bound is not None and positions is not None and bound[1] > positions:
        named = model if isinstance(model, str) else f"stage {model.name!r} builds"
        raise ConfigError(f"stage {stage.name!r}: {bound[0]} is {bound[1]} tokens, over the {positions} positions "
                          f"of the model {named} (max_position_embeddings); lower it: data.truncation cuts "
                          "longer rows to fit")


def _pairs(stage: StageBase, path: str, tokenizer: Any, tally: LengthTally) -> None:
    columns = {k: v for k, v in _data(stage).columns.items() if k in PAIR_FIELDS}  # type: ignore[union-attr]

    def each(offset: int, rows: PairRows) -> None:
        tokenize_pairs(render_pairs(rows, tokenizer, path, offset), tokenizer, lengths=tally, source=path,
                       offset=offset)

    stream_pairs(path, columns, each)
    tally.finish()


def _sft(stage: StageBase, path: str, tokenizer: Any, tally: LengthTally) -> None:
    assert isinstance(stage, sft.SFTStage)
    sft.load_examples(path, stage, tokenizer, tally)


def _preferences(stage: StageBase, path: str, tokenizer: Any, tally: LengthTally) -> None:
    kto.load_rows(path, tokenizer, _data(stage).columns, tally, seed=0)  # type: ignore[union-attr]


def _prompts(stage: StageBase, path: str, tokenizer: Any, tally: LengthTally) -> None:
    online_rollout.load_prompts(path, tokenizer, _data(stage).column, tally)  # type: ignore[union-attr]


LENGTH_CHECKS: dict[str, Callable[[StageBase, str, Any, LengthTally], None]] = {
    "pairs": _pairs, "sft": _sft, "preferences": _preferences, "prompts": _prompts,
}


def _data(stage: StageBase) -> LengthFields | PromptLengthFields:
    data = stage.field("data")
    assert isinstance(data, (LengthFields, PromptLengthFields))
    return data


def check_lengths(stage: StageBase, model: str) -> list[str]:
    """Tokenize the stage's literal data files under its length policy; one line per file."""
    files = [(f, kind, path) for f, (kind, _) in stage.inputs().items()
             if kind in LENGTH_CHECKS and isinstance(path := stage.field(f), str)
             and not (kind == "prompts" and stage.reads_tasks())]  # tasks: their prompts are the environment's
    if not files:
        return []
    try:
        tokenizer = load_tokenizer(model)
    except DataError as exc:  # a tokenizer that needs remote code, say: the run reports it at the stage
        return [f"stage {stage.name!r}: lengths not checked ({exc})"]
    lines = []
    for field_path, kind, path in files:
        tally = _data(stage).lengths(path)
        LENGTH_CHECKS[kind](stage, path, tokenizer, tally)
        lines.append(f"stage {stage.name!r} {field_path}: {tally.line()}")
    return lines
