"""Pure tensor functions: losses, estimators, selection rules. They never receive a config object.

The functions users call by name are importable from here (``from pipelines.algorithms import
kto_loss``); their modules load on first use, so importing one submodule never runs the others.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {"dpo_loss": "dpo", "simpo_loss": "dpo", "orpo_loss": "dpo", "kto_loss": "kto",
            "policy_loss": "ppo", "grpo_advantages": "ppo"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _EXPORTS[name] == "dpo":
        from pipelines.algorithms import dpo as module
    elif _EXPORTS[name] == "kto":
        from pipelines.algorithms import kto as module
    else:
        from pipelines.algorithms import ppo as module
    return getattr(module, name)
