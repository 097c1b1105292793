"""Stage registry: kind → ``run(config, ctx) -> outputs``. A new algorithm is a new entry here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipelines.stages import offline_dpo, synthetic_task

STAGES: dict[str, Callable[[Any, Any], dict[str, str]]] = {
    "synthetic_task": synthetic_task.run,
    "offline_dpo": offline_dpo.run,
}
