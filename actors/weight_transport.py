"""A broadcast group from trainer rank 0 to the rollout workers: gloo on CPU, NCCL on GPUs.

The group is built directly on its own TCPStore (``ProcessGroupGloo`` / ``ProcessGroupNCCL``), not
through ``init_process_group``: the trainer ranks already have DeepSpeed's default group and a
rollout worker's vLLM engine has its own, and neither may be disturbed. Rank 0 is the trainer;
rollout worker i is rank 1 + i.

A bucket travels as one flat buffer per dtype (one collective per dtype, not per tensor); the
receiver knows every tensor's name, shape and dtype from the bucket's metadata and rebuilds views.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def describe(tensors: dict[str, torch.Tensor]) -> list[TensorMeta]:
    return [TensorMeta(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()]


def _by_dtype(metas: list[TensorMeta]) -> dict[str, list[TensorMeta]]:
    groups: dict[str, list[TensorMeta]] = {}
    for m in metas:
        groups.setdefault(m.dtype, []).append(m)
    return groups


class BroadcastGroup:
    """One member of the weight-broadcast group; rank 0 sends, every other rank receives."""

    def __init__(self, backend: str, host: str, port: int, rank: int, world_size: int, *,
                 timeout_s: float = 600.0, store: dist.TCPStore | None = None) -> None:
        """``store``: rank 0's, already listening at ``host:port`` (else rank 0 opens it there)."""
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight-broadcast backend must be gloo or nccl, not {backend!r}")
        timeout = datetime.timedelta(seconds=timeout_s)
        store = store or dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        store = dist.PrefixStore("rlhf-weights", store)
        self.backend = backend
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        if backend == "gloo":
            self.group = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        else:
            self.group = dist.ProcessGroupNCCL(store, rank, world_size)
        self._store = store  # keep the store (and on rank 0 its server) alive as long as the group

    def _broadcast(self, buffer: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([buffer], opts).wait()

    def send(self, tensors: dict[str, torch.Tensor]) -> int:
        """Rank 0: broadcast one bucket; returns its bytes."""
        assert self.rank == 0, "only rank 0 sends"
        sent = 0
        for dtype, metas in _by_dtype(describe(tensors)).items():
            flat = torch.cat([tensors[m.name].detach().reshape(-1).to(self.device) for m in metas])
            self._broadcast(flat)
            sent += flat.numel() * flat.element_size()
        return sent

    def receive(self, metas: list[TensorMeta]) -> dict[str, torch.Tensor]:
        """Ranks ≥ 1: receive one bucket described by ``metas``; tensors own their storage."""
        out: dict[str, torch.Tensor] = {}
        for dtype, group in _by_dtype(metas).items():
            flat = torch.empty(sum(m.numel() for m in group), dtype=group[0].torch_dtype, device=self.device)
            self._broadcast(flat)
            offset = 0
            for m in group:
                out[m.name] = flat[offset : offset + m.numel()].view(m.shape)
                offset += m.numel()
        return {m.name: out[m.name] for m in metas}

    def close(self) -> None:
        self.group = None
        self._store = None


def plan_buckets(tensors: dict[str, torch.Tensor], bucket_bytes: int) -> list[list[str]]:
    """Tensor names grouped, in order, into buckets of about ``bucket_bytes`` (a tensor is never split)."""
    buckets: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(name)
        size += nbytes
    return buckets
