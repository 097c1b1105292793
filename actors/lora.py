"""LoRA adapters (PEFT) on a trainer's model: only the adapters train (and, on a reward model or
critic, its one-label score head); everything that leaves the trainer (the weights the rollout
engines receive, the final checkpoint, the weights digest) is the merged model under the base
model's own parameter names, so vLLM, transformers and the reward and reference roles need to know
nothing of adapters. With the adapters disabled the trainer's model is the stage's starting model:
the reference a stage would otherwise load a second copy of.

Merging is computed, never applied in place: ``W + ΔW`` per adapted layer, from PEFT's own
``get_delta_weight``, so the trained weights are never rounded through a merge and unmerge.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch

ADAPTER = "default"
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "reward_model": "SEQ_CLS"}


def wrap(model: torch.nn.Module, lora: dict[str, Any], kind: str = "causal_lm") -> torch.nn.Module:
    """``model`` with LoRA adapters of ``lora`` (rank, alpha, dropout, target_modules); only the
    adapters require gradients, and for a ``reward_model`` (a sequence classifier) its score head,
    which PEFT trains whole beside the adapters (a fresh head has nothing to adapt)."""
    from peft import LoraConfig, get_peft_model

    targets = lora["target_modules"]
    config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=targets if isinstance(targets, str) else list(targets),
                        task_type=TASK_TYPES[kind], bias="none")
    return get_peft_model(model, config)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    return {"params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _plain(name: str) -> str:
    """A PEFT module's state-dict name under the base model's own naming."""
    return name.replace(".base_layer.", ".").replace(f".modules_to_save.{ADAPTER}.", ".")


def base_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The model's weights without adapters under the base model's names (a trained head: its trained
    copy), the live tensors, nothing copied: the names, shapes and dtypes of the merged weights."""
    return {_plain(name): tensor for name, tensor in model.get_base_model().state_dict().items()
            if ".lora_" not in name and ".original_module." not in name}  # adapters; a trained head's original


def merged_state_dict(model: Any, names: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """The merged weights (base + every adapter's delta) under the base model's parameter names, as
    new CPU tensors; only ``names`` when given (one weight-sync bucket at a time: no full merged copy
    is ever held). ``model`` is left as it is."""
    from peft.tuners.lora import LoraLayer

    adapted = {f"{name}.weight": module for name, module in model.get_base_model().named_modules()
               if isinstance(module, LoraLayer) and ADAPTER in module.lora_A}
    out = {}
    with torch.no_grad():
        for name, tensor in base_state_dict(model).items():
            if names is not None and name not in names:
                continue
            value = tensor.detach()
            if name in adapted:
                value = value + adapted[name].get_delta_weight(ADAPTER).to(value.dtype)
            out[name] = value.to("cpu", copy=True)
    return out


def adapter_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """What a LoRA trainer changes: the adapter weights, under the PEFT model's names."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
