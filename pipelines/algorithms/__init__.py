"""Pure tensor functions: losses, estimators, selection rules. They never receive a config object."""

from pipelines.algorithms.dpo import dpo_loss, orpo_loss, simpo_loss
from pipelines.algorithms.kto import kto_loss
from pipelines.algorithms.ppo import grpo_advantages, policy_loss

__all__ = ["dpo_loss", "grpo_advantages", "kto_loss", "orpo_loss", "policy_loss", "simpo_loss"]
