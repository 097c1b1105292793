"""The reference model: frozen weights that return log-probs for given token ids."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from actors.modeling import evaluate_in_chunks, load_causal_lm, pick_device, resolve_dtype
from pipelines.data.batches import TensorBatch


class ReferenceModel:
    """One rank of the reference group. Cheap ``__init__``; ``setup`` loads the model. Frozen weights: a
    dead rank is replaced in place, and the group may serve the next stage too."""

    REPLACEABLE = True
    STATELESS = True

    def __init__(self, rank: int, world_size: int, model_path: str, *, precision: str = "auto",
                 num_threads: int = 1, trust_remote_code: bool = False, tokens_per_chunk: int | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.model_path = model_path
        self.precision = precision
        self.num_threads = num_threads
        self.trust_remote_code = trust_remote_code
        self.tokens_per_chunk = tokens_per_chunk  # chunks by a token budget (TensorBatch.token_microbatches)
        self.model: torch.nn.Module | None = None
        self.device = torch.device("cpu")

    def setup(self) -> dict[str, Any]:
        """Load the model (once: a group kept alive for the next stage is set up again as a no-op)."""
        if self.model is not None:
            return {"rank": self.rank, "device": str(self.device), "reused": True}
        torch.set_num_threads(self.num_threads)
        self.device = pick_device()
        dtype = resolve_dtype(self.precision, self.device)
        self.model = load_causal_lm(self.model_path, dtype=dtype, trust_remote_code=self.trust_remote_code)
        self.model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        return {"rank": self.rank, "device": str(self.device), "dtype": str(dtype)}

    def evaluate(self, batch: TensorBatch, fn: Callable[[Any, Any], Any], rows_per_chunk: int = 64) -> Any:
        """``fn(model, chunk)`` over this rank's rows without gradients; tensors come back on CPU."""
        assert self.model is not None, "setup() first"
        return evaluate_in_chunks(self.model, batch, fn, rows_per_chunk=rows_per_chunk, device=self.device,
                                  tokens_per_chunk=self.tokens_per_chunk)
