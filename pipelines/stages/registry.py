"""The stage kinds: ``kind`` → its config model and ``run``. Adding a kind is its module and one entry here.

The pipeline config's union of stage models, the plan's derived numbers and the CLI's list of kinds
all come from ``KINDS``. Checks of a stage's literal inputs (``preflight_inputs``) also live here:
they run in the driver before any actor starts.
"""

from __future__ import annotations

from pipelines.data.formats import PAIR_FIELDS, check_pairs, check_preferences, read_prompts, read_sft
from pipelines.data.rewards import load_reward_function
from pipelines.data.tokens import check_model_source
from pipelines.stages import (
    agent_task,
    distill,
    evaluate,
    init_model,
    kto,
    offline_dpo,
    onpolicy_dpo,
    ppo,
    reward_model,
    sft,
    synthetic_task,
)
from pipelines.stages.base import StageBase, StageKind
from pipelines.stages.multi_turn import load_tasks

MODULES = (synthetic_task, init_model, agent_task, sft, reward_model, offline_dpo, kto, onpolicy_dpo, ppo, distill,
           evaluate)
KINDS: dict[str, StageKind] = {m.STAGE.kind: m.STAGE for m in MODULES}

INPUT_CHECKS = {
    "pairs": lambda path, stage: check_pairs(path, {k: v for k, v in stage.data.columns.items() if k in PAIR_FIELDS}),
    "preferences": lambda path, stage: check_preferences(path, stage.data.columns),
    "model": lambda path, stage: check_model_source(path),
    "sft": lambda path, stage: read_sft(path, stage.data.format, stage.data.columns),
    "reward_model": lambda path, stage: check_model_source(path),
    "prompts": lambda path, stage: (load_tasks(path, stage.data.column) if stage.reads_tasks()
                                    else read_prompts(path, stage.data.column, check_only=True)),
}


def preflight_inputs(stage: StageBase) -> None:
    """Check a stage's literal (non-``from:``) inputs and its function rewards before any actor starts:
    data files are read through (every row's shape checked), models located."""
    for spec in stage.function_rewards():
        load_reward_function(spec)
    for field_path, (kind, _) in stage.inputs().items():
        value = stage.field(field_path)
        if isinstance(value, str) and kind in INPUT_CHECKS:
            INPUT_CHECKS[kind](value, stage)
