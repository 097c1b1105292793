"""What a trainer rank is given (``TrainerSpec``: plain values the stage builds from its config) and
the rules it derives from them: the learning-rate schedule, the ZeRO stage it runs, how long it
waits for its peers."""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Any

import torch

# How long torch.distributed waits for the ranks to join, and for a collective (DeepSpeed's default).
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class TrainerSpec:
    """Everything a trainer rank needs, as plain values (built by the stage from its config)."""

    model_path: str
    total_steps: int
    examples_per_step: int  # global batch, all ranks together
    examples_per_microbatch: int  # per rank, per forward/backward
    lr: float
    zero_stage: int = 2
    precision: str = "auto"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    num_threads: int = 1
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    model_kind: str = "causal_lm"  # or "reward_model": a one-label sequence classifier
    lora: dict[str, Any] | None = None  # rank, alpha, dropout, target_modules: train adapters only (actors.lora)
    partition_one_rank: bool = False  # keep ZeRO-1/2 on a lone fp32 rank (tests of the partitioned state)
    tokens_per_microbatch: int | None = None  # micro-batches by a token budget (TensorBatch.token_microbatches)


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Learning-rate factor at optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def effective_zero_stage(spec: TrainerSpec, world_size: int, dtype: torch.dtype) -> int:
    """The ZeRO stage a rank runs. A lone fp32 rank has nothing to partition: ZeRO-1/2 would only add a
    flat fp32 copy of the weights and gradient bucketing (13% of a tiny model's step on CPU, measured),
    so it runs stage 0, which DeepSpeed steps with the same AdamW. Several ranks, or bf16 (whose fp32
    master weights ZeRO keeps), keep the configured stage."""
    if spec.zero_stage in (1, 2) and world_size == 1 and dtype == torch.float32 and not spec.partition_one_rank:
        return 0
    return spec.zero_stage
