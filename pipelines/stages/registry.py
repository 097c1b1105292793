"""The stage kinds: ``kind`` → its config model and ``run``. Adding a kind is its module and one entry here.

The pipeline config's union of stage models, the plan's derived numbers and the CLI's list of kinds
all come from ``KINDS``. Checks of a stage's literal inputs (``preflight_inputs``) also live here:
they run in the driver before any actor starts.
"""

from __future__ import annotations

from typing import Any

from pipelines.data import PAIR_COLUMNS, RESPONSE_COLUMNS, check_model_source, read_string_table
from pipelines.rewards import load_reward_function
from pipelines.sft_data import read_sft_rows
from pipelines.stages import offline_dpo, onpolicy_dpo, ppo, reward_model, sft, synthetic_task
from pipelines.stages.config import StageKind

MODULES = (synthetic_task, sft, reward_model, offline_dpo, onpolicy_dpo, ppo)
KINDS: dict[str, StageKind] = {m.STAGE.kind: m.STAGE for m in MODULES}

INPUT_CHECKS = {
    "pairs": lambda path: read_string_table(path, PAIR_COLUMNS, what="preference pairs",
                                            may_be_empty=RESPONSE_COLUMNS),
    "model": check_model_source,
    "sft": read_sft_rows,
    "reward_model": check_model_source,
}


def preflight_inputs(stage: Any) -> None:
    """Check a stage's literal (non-``from:``) inputs and its function rewards before any actor starts."""
    for spec in stage.function_rewards():
        load_reward_function(spec)
    for field_path, (kind, _) in stage.inputs().items():
        value = stage.field(field_path)
        if isinstance(value, str) and kind == "prompts":
            read_string_table(value, (stage.data.column,), what="prompts")
        elif isinstance(value, str) and kind in INPUT_CHECKS:
            INPUT_CHECKS[kind](value)
