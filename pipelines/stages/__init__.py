"""Stage registry: kind → ``run(config, ctx) -> outputs``. A new algorithm is a new entry here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipelines.stages import offline_dpo, onpolicy_dpo, ppo, reward_model, sft, synthetic_task

STAGES: dict[str, Callable[[Any, Any], dict[str, str]]] = {
    "synthetic_task": synthetic_task.run,
    "sft": sft.run,
    "reward_model": reward_model.run,
    "offline_dpo": offline_dpo.run,
    "onpolicy_dpo": onpolicy_dpo.run,
    "ppo": ppo.run,
}
