"""The names rollout engines load a policy's weights by: its checkpoint's, not always the live module's.

vLLM loads a checkpoint as ``save_pretrained`` wrote it, and takes later weights under the same
names. Two things make the live module's ``state_dict`` differ from that:

* tied weights: Qwen2's, Gemma's and GPT-2's output layer is their input embedding; the
  checkpoint holds the embedding alone and the engine ties the two itself;
* renamed weights: transformers 5 loads some checkpoints under new names and writes the old ones
  back on save (GPT-NeoX's ``embed_out`` is ``lm_head`` in memory), through its conversion mapping.

``export_names`` gives, for a module's state, the checkpoint's name of every tensor the engine takes.
"""

from __future__ import annotations

from typing import Any

import torch


def export_names(model: Any, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Checkpoint name → state name, for each tensor of ``state`` (the live tensors of ``model``, an
    HF model) the engines take: a tied tensor once (its first name), each under the name
    ``save_pretrained`` writes."""
    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:  # (ZeRO-3's partitioned placeholders are all empty)
            continue
        seen.add(key)
        kept[name] = tensor
    return _checkpoint_names(model, kept)


def _checkpoint_names(model: Any, state: dict[str, torch.Tensor]) -> dict[str, str]:
    identity = {name: name for name in state}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without conversion mappings saves the live names
        return identity
    reverted = revert_weight_conversion(model, dict(state))
    by_tensor = {id(tensor): name for name, tensor in state.items()}
    names = {new: by_tensor.get(id(tensor)) for new, tensor in reverted.items()}
    if None in names.values() or len(names) != len(state):
        return identity  # a conversion that builds new tensors (merged experts): the engine says what it misses
    return {new: old for new, old in names.items() if old is not None}
