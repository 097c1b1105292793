"""A trainer rank's in-stage checkpoint: everything needed to continue training exactly, without
pickling anything. Full weights (rank 0; a LoRA trainer's adapters only: the frozen base is the
stage's starting model), this rank's fp32 master partitions and Adam moments, the LR scheduler, the
step counts and the RNG; tensors in safetensors, the rest in JSON. ZeRO stages 0-2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from actors import lora


def _zero_parts(engine: Any) -> tuple[list[torch.Tensor], Any]:
    """(this rank's fp32 master partitions, the base torch optimizer). Without ZeRO-1/2 there is
    no separate master copy and DeepSpeed's optimizer is the torch one."""
    opt = engine.optimizer
    master = getattr(opt, "single_partition_of_fp32_groups", None)
    return (list(master), opt.optimizer) if master is not None else ([], opt)


def _weights(engine: Any, adapters_only: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to save, alias → saved name of tied copies) of the module's weights."""
    if adapters_only:
        return lora.adapter_state_dict(engine.module), {}
    copies = {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
    return _dedupe_tied(engine.module.state_dict(), copies)


def save_state(engine: Any, out: Path, *, rank: int, world_size: int, zero_stage: int, steps_done: int,
               adapters_only: bool) -> int:
    """Write the rank's state into ``out`` (``weights.*`` from rank 0, ``rank<i>.*`` from each rank);
    returns the bytes this rank wrote."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    written = 0
    if rank == 0:
        weights, aliases = _weights(engine, adapters_only)
        save_file(weights, str(out / "weights.safetensors"))
        (out / "weights.json").write_text(json.dumps({"aliases": aliases}))
        written += sum(t.numel() * t.element_size() for t in weights.values())
    master, base = _zero_parts(engine)
    opt_state = base.state_dict()
    tensors = {f"master.{i}": t.detach().cpu().clone() for i, t in enumerate(master)}
    scalars: dict[str, Any] = {}
    for pid, entry in opt_state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"opt.{pid}.{key}"] = value.detach().cpu().clone()
            else:
                scalars[f"{pid}.{key}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    scheduler = {k: v for k, v in engine.lr_scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {"world_size": world_size, "zero_stage": zero_stage, "steps_done": steps_done,
            "global_steps": engine.global_steps, "param_groups": opt_state["param_groups"],
            "scalars": scalars, "scheduler": scheduler}
    (out / f"rank{rank}.json").write_text(json.dumps(meta))
    return written + sum(t.numel() * t.element_size() for t in tensors.values())


def load_state(engine: Any, src: Path, *, rank: int, world_size: int, zero_stage: int, adapters_only: bool) -> int:
    """Restore what ``save_state`` wrote (same world size and ZeRO stage) into ``engine``; returns the
    trainer's step count."""
    from safetensors.torch import load_file

    meta = json.loads((src / f"rank{rank}.json").read_text())
    if (meta["world_size"], meta["zero_stage"]) != (world_size, zero_stage):
        raise ValueError(f"{src}: written by {meta['world_size']} rank(s) at ZeRO-{meta['zero_stage']}, "
                         f"this group is {world_size} at ZeRO-{zero_stage}")
    weights = load_file(str(src / "weights.safetensors"))
    for alias, name in json.loads((src / "weights.json").read_text())["aliases"].items():
        weights[alias] = weights[name]
    missing, unexpected = engine.module.load_state_dict(weights, strict=False)
    if adapters_only:  # only the adapters were saved: the rest is the frozen base, already loaded
        trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
        missing = [name for name in missing if name in trainable]
    if missing or unexpected:
        raise ValueError(f"{src}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    tensors = load_file(str(src / f"rank{rank}.safetensors"))
    master, base = _zero_parts(engine)
    with torch.no_grad():
        for i, t in enumerate(master):
            t.copy_(tensors[f"master.{i}"])
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    base.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    engine.lr_scheduler.load_state_dict(meta["scheduler"] | {"lr_lambdas": [None] * len(meta["param_groups"])})
    torch.set_rng_state(tensors["rng.torch"])
    engine.global_steps = meta["global_steps"]
    return meta["steps_done"]


def _dedupe_tied(live: dict[str, torch.Tensor], copies: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop the copies of tied parameters (the same tensor under two names, e.g. tied embeddings):
    safetensors refuses shared tensors. Returns (unique tensors, alias → kept name)."""
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in live.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = copies[name]
    return unique, aliases
