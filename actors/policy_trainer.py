"""The policy trainer: one data-parallel DeepSpeed ZeRO rank per actor.

torch.distributed runs over NCCL on GPUs and gloo on CPU. Every stage trains through the one
``train_step(batch, loss_fn)``: it micro-batches, accumulates, clips and steps the optimizer;
stages differ only in the loss and in how they build the batch.
"""

from __future__ import annotations

import hashlib
import os
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from actors import lora, native_ops, trainer_state
from actors.fsutil import atomic_directory
from actors.modeling import (
    evaluate_in_chunks,
    greedy_generate,
    load_model,
    pick_device,
    resolve_dtype,
    token_groups,
)
from actors.trainer_spec import RENDEZVOUS_TIMEOUT, TrainerSpec, effective_zero_stage, lr_multiplier
from actors.weight_names import export_names
from pipelines.data.batches import TensorBatch

# loss_fn(model, microbatch) -> (scalar loss, {metric name: scalar tensor}); metrics are means.
LossFn = Callable[[Any, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class PolicyTrainer:
    """One rank of the policy-trainer group. Cheap ``__init__``; ``setup`` loads and initialises.
    It holds training state: a dead rank rolls its stage back (``REPLACEABLE`` False)."""

    REPLACEABLE = False
    STATELESS = False

    def __init__(self, rank: int, world_size: int, spec: TrainerSpec) -> None:
        self.rank = rank
        self.world_size = world_size
        self.spec = spec
        self.engine: Any = None
        self._weight_group: Any = None
        self._names: dict[str, str] | None = None  # checkpoint name -> state name of what the engines take
        self.tokenizer: Any = None
        self.device = torch.device("cpu")
        self.steps_done = 0
        self.zero_stage = spec.zero_stage
        self._rendezvous: Any = None  # rank 0's store, listening from open_rendezvous() until a group takes it

    def open_rendezvous(self, world_size: int | None = None) -> tuple[str, int]:
        """(address, port) where a group's members meet (rank 0 only): the trainer group's in ``setup``,
        or with ``world_size`` the weight-broadcast group's in ``open_weight_group``. The store listens
        on a port the OS picked from now on, so no other process can take it before they join."""
        host = socket.gethostbyname(socket.gethostname())
        self._rendezvous = torch.distributed.TCPStore(host, 0, world_size or self.world_size, is_master=True,
                                                      timeout=RENDEZVOUS_TIMEOUT, wait_for_workers=False)
        return host, self._rendezvous.port

    def _take_rendezvous(self) -> Any:
        """The store ``open_rendezvous`` opened, handed to the one group that meets there."""
        store, self._rendezvous = self._rendezvous, None
        return store

    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        """Join the process group, load the model, build the DeepSpeed engine."""
        self.device = pick_device()
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.device.type == "cuda" else "cpu")
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
        )
        torch.set_num_threads(self.spec.num_threads)
        torch.manual_seed(self.spec.seed)
        import deepspeed
        from transformers import AutoTokenizer

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if not torch.distributed.is_initialized():  # (a process holds one group: in-process tests share it)
            store = self._take_rendezvous() or torch.distributed.TCPStore(
                master_addr, master_port, self.world_size, is_master=self.rank == 0, timeout=RENDEZVOUS_TIMEOUT)
            torch.distributed.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size,
                                                 timeout=RENDEZVOUS_TIMEOUT)
        if backend == "gloo":  # DeepSpeed's CPU collectives load a JIT op; a killed loader must not stall us
            native_ops.load_shm_comm(who=f"policy trainer rank {self.rank}")
        deepspeed.init_distributed(dist_backend=backend)  # takes the group joined above
        dtype = resolve_dtype(self.spec.precision, self.device)
        self.zero_stage = effective_zero_stage(self.spec, self.world_size, dtype)
        model = load_model(self.spec.model_path, self.spec.model_kind, dtype=torch.float32,
                           trust_remote_code=self.spec.trust_remote_code)
        if self.spec.lora:
            if self.spec.zero_stage == 3:
                raise ValueError("trainer.lora: LoRA runs at ZeRO stages 0-2, not ZeRO-3")
            model = lora.wrap(model, self.spec.lora, self.spec.model_kind)
        if self.spec.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if self.spec.lora:
                # frozen embeddings: the checkpointed blocks need an input that wants grad
                model.enable_input_require_grads()
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.spec.model_path, trust_remote_code=self.spec.trust_remote_code
        )
        s = self.spec
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=s.lr, betas=s.betas, eps=s.eps,
            weight_decay=s.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(
                step, warmup_steps=s.warmup_steps, total_steps=s.total_steps,
                schedule=s.schedule, min_lr_ratio=s.min_lr_ratio,
            ),
        )
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self._ds_config(dtype),
            dist_init_required=False,
        )
        return {"rank": self.rank, "device": str(self.device), "dtype": str(dtype), "zero_stage": self.zero_stage,
                "backend": torch.distributed.get_backend(), **lora.parameter_counts(model)}

    def _ds_config(self, dtype: torch.dtype) -> dict[str, Any]:
        s = self.spec
        micro_per_rank = s.examples_per_step // self.world_size
        return {
            "train_batch_size": s.examples_per_step,
            "train_micro_batch_size_per_gpu": s.examples_per_microbatch,
            "gradient_accumulation_steps": micro_per_rank // s.examples_per_microbatch,
            # Stage 0 is clipped in train_step, where the norm is kept (DeepSpeed's stage 0 drops it).
            "gradient_clipping": 0.0 if self.zero_stage == 0 else s.max_grad_norm,
            "zero_optimization": {"stage": self.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
            "bf16": {"enabled": dtype == torch.bfloat16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def train_step(self, batch: TensorBatch, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over this rank's shard of the global batch.

        Args:
            batch: this rank's rows: examples_per_step / world_size of them.
            loss_fn: ``loss_fn(model, microbatch) -> (loss, metrics)``; metrics are batch means.

        Returns:
            Row-weighted means of the loss_fn metrics, plus grad_norm, lr, num_tokens, compute_s and
            this process's peak memory so far (peak_rss_mib; on a GPU also peak_gpu_mib).
        """
        expected = self.spec.examples_per_step // self.world_size
        if len(batch) != expected:
            raise ValueError(f"rank {self.rank} got {len(batch)} rows, expected {expected}")
        self.engine.train()
        sums: dict[str, torch.Tensor] = {}
        clipped_norm = None
        start = time.perf_counter()
        micros = [micro.trimmed()[0] for micro in self._microbatches(batch)]
        # Micro-batches may differ in size (a token budget): each loss, a mean over its micro-batch,
        # is weighted by the micro-batch's share of the rank's rows (or loss tokens: losses.TokenMean),
        # and the optimizer steps after the last one.
        weights = [float(getattr(loss_fn, "weight", len)(micro)) for micro in micros]
        total = sum(weights) or 1.0
        for i, micro in enumerate(micros):
            share = weights[i] / total
            self.engine.set_gradient_accumulation_boundary(i == len(micros) - 1)
            loss, metrics = loss_fn(self.engine, micro.to(self.device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.steps_done + 1}")
            self.engine.backward(loss * share, scale_wrt_gas=False)
            if self.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
                trained = [p for p in self.engine.module.parameters() if p.requires_grad]
                clipped_norm = torch.nn.utils.clip_grad_norm_(trained, self.spec.max_grad_norm)
            self.engine.step()
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value.detach() * share
        self.steps_done += 1
        out = {name: float(value) for name, value in sums.items()}
        positions = sum(micro.positions() for micro in micros)
        out["data/pad_fraction"] = 1.0 - batch.num_tokens() / positions if positions else 0.0
        grad_norm = self.engine.get_global_grad_norm() if self.zero_stage else clipped_norm
        out["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        out["lr"] = float(self.engine.get_lr()[0])
        out["num_tokens"] = float(batch.num_tokens())
        out["compute_s"] = time.perf_counter() - start
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        if self.device.type == "cuda":
            out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out

    def _microbatches(self, batch: TensorBatch) -> list[TensorBatch]:
        """This rank's micro-batches of a step: ``examples_per_microbatch`` consecutive rows, or
        with ``tokens_per_microbatch`` rows packed by length, as many on every rank (each backward
        may reduce gradients across the ranks)."""
        if not self.spec.tokens_per_microbatch:
            return batch.chunks(self.spec.examples_per_microbatch)
        return [batch.select(rows) for rows in token_groups(batch, self.spec.tokens_per_microbatch,
                                                            self._most_over_ranks)]

    def _most_over_ranks(self, n: int) -> int:
        """The largest ``n`` over the ranks (a collective: every rank calls it)."""
        if self.world_size == 1:
            return n
        value = torch.tensor([n], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return int(value.item())

    def evaluate(self, batch: TensorBatch, fn: Callable[[Any, Any], Any], rows_per_chunk: int = 64) -> Any:
        """``fn(model, chunk)`` without gradients over this rank's rows; tensors come back on CPU.
        Chunks follow ``tokens_per_microbatch`` when set; under ZeRO-3 every rank runs as many."""
        gathered = self.zero_stage == 3 and self.world_size > 1  # every forward gathers from all ranks
        return evaluate_in_chunks(self.engine, batch, fn, rows_per_chunk=rows_per_chunk, device=self.device,
                                  tokens_per_chunk=self.spec.tokens_per_microbatch,
                                  count=self._most_over_ranks if gathered else None)

    def evaluate_base(self, batch: TensorBatch, fn: Callable[[Any, Any], Any], rows_per_chunk: int = 64) -> Any:
        """``evaluate`` on the stage's starting model: a LoRA trainer's model with its adapters
        disabled. The reference of a LoRA stage whose reference is its starting policy, without a
        second copy of the model in a reference group."""
        if not self._lora:
            raise ValueError("evaluate_base needs a LoRA trainer (trainer.lora): a full fine-tune keeps no base model")
        with self.engine.module.disable_adapter():
            return self.evaluate(batch, fn, rows_per_chunk)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, rows_per_chunk: int = 64) -> list[list[int]]:
        """Greedy continuations of this rank's prompts (token ids), up to EOS."""
        synced = self.spec.zero_stage == 3 and self.world_size > 1  # every rank must join each forward
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        was_training = self.engine.training
        self.engine.eval()
        out: list[list[int]] = []
        with torch.no_grad():
            for i in range(0, len(prompts), rows_per_chunk):
                out += greedy_generate(self.engine, prompts[i : i + rows_per_chunk], max_new_tokens=max_new_tokens,
                                       pad_id=pad_id, eos_id=self.tokenizer.eos_token_id, device=self.device,
                                       synced_gpus=synced)
        if was_training:
            self.engine.train()
        return out

    @property
    def _lora(self) -> bool:
        return bool(self.spec.lora)

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full parameters on every rank (a collective under ZeRO-3); with LoRA, the merged weights
        under the base model's names."""
        if self._lora:
            return lora.merged_state_dict(self.engine.module)
        if self.spec.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
            return state if state is not None else {}
        return {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}

    def save_hf(self, out_dir: str, extra_files: dict[str, str] | None = None) -> str:
        """Write an HF checkpoint (safetensors + tokenizer) atomically; rank 0 writes, all ranks join.

        ``extra_files`` (name → text) land in the same directory, inside the same atomic rename.
        """
        state = self._full_state_dict()
        if self.rank == 0:
            with atomic_directory(out_dir) as tmp:
                module = self.engine.module
                if self._lora:  # the merged model, and the adapter on its own beside it
                    module.save_pretrained(str(Path(tmp) / "adapter"), safe_serialization=True)
                    module = module.get_base_model()
                module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                for name, text in (extra_files or {}).items():
                    (Path(tmp) / name).write_text(text)
        torch.distributed.barrier()
        return out_dir

    # ------------------------------------------------------------ in-stage checkpoints (resume)

    def save_state(self, out_dir: str) -> int:
        """Everything needed to continue training exactly (``trainer_state.save_state``); returns the
        bytes this rank wrote."""
        if self.zero_stage == 3:
            raise NotImplementedError("in-stage checkpoints support ZeRO stages 0-2; set checkpoint.every: 0")
        return trainer_state.save_state(self.engine, Path(out_dir), rank=self.rank, world_size=self.world_size,
                                        zero_stage=self.zero_stage, steps_done=self.steps_done,
                                        adapters_only=self._lora)

    def load_state(self, in_dir: str) -> int:
        """Restore what ``save_state`` wrote (same world size and ZeRO stage); returns the step count."""
        self.steps_done = trainer_state.load_state(self.engine, Path(in_dir), rank=self.rank,
                                                   world_size=self.world_size, zero_stage=self.zero_stage,
                                                   adapters_only=self._lora)
        return self.steps_done

    def bucket_plan(self, bucket_bytes: int) -> list[list[str]]:
        """Parameter names grouped into buckets of about ``bucket_bytes`` (``weight_transport.plan_buckets``)."""
        from actors.weight_transport import plan_buckets

        return plan_buckets(self._export_layout(), bucket_bytes)

    def weight_buckets(self, plan: list[list[str]]) -> tuple[dict[str, torch.Tensor], ...]:
        """The full weights as one dict per bucket of ``plan`` (every rank joins the ZeRO-3 gather)."""
        if self.spec.zero_stage == 3:  # only rank 0 holds the gathered state; the others return empty buckets
            state, own = self._full_state_dict(), self._export_own()
            buckets = tuple({name: state[own[name]].clone() for name in names if own[name] in state} for names in plan)
        else:
            buckets = tuple(self._export_bucket(names, owned=True) for names in plan)
        return buckets if len(buckets) > 1 else buckets[0]

    def open_weight_group(self, backend: str, host: str, port: int, world_size: int) -> str:
        """Rank 0 joins the weight-broadcast group as its root (the other ranks only gather under ZeRO-3)."""
        if self.rank == 0:
            from actors.weight_transport import BroadcastGroup

            self._weight_group = BroadcastGroup(backend, host, port, 0, world_size, store=self._take_rendezvous())
        return backend

    def bucket_meta(self, plan: list[list[str]]) -> list[list[Any]]:
        """Name, shape and dtype of every tensor of every bucket (what receivers allocate)."""
        from actors.weight_transport import describe

        state = self._export_layout()
        return [describe({n: state[n] for n in names}) for names in plan]

    def broadcast_weights(self, plan: list[list[str]]) -> int:
        """Broadcast the full weights bucket by bucket over the weight group; returns bytes sent (rank 0)."""
        if self.spec.zero_stage == 3:  # every rank joins the gather
            state, own = self._full_state_dict(), self._export_own()
            if self.rank != 0:
                return 0
            return sum(self._weight_group.send({name: state[own[name]] for name in names}) for names in plan)
        if self.rank != 0:  # ZeRO-0/1/2: rank 0's module holds the full weights
            return 0
        return sum(self._weight_group.send(self._export_bucket(names)) for names in plan)

    def _export_layout(self) -> dict[str, torch.Tensor]:
        """The weights' names, shapes and dtypes as the rollout engines take them (ZeRO-0/1/2), nothing
        copied: the module's own tensors, or with LoRA the base ones, under the checkpoint's names
        (``weight_names.export_names``: a tied weight once, a renamed one as saved)."""
        state = lora.base_state_dict(self.engine.module) if self._lora else self.engine.module.state_dict()
        if self._names is None:
            module = self.engine.module
            self._names = export_names(module.get_base_model() if self._lora else module, state)
        return {name: state[own] for name, own in self._names.items()}

    def _export_own(self) -> dict[str, str]:
        """Checkpoint name -> the module's state name, of every tensor the engines take."""
        if self._names is None:
            self._export_layout()
        assert self._names is not None
        return self._names

    def _export_bucket(self, names: list[str], owned: bool = False) -> dict[str, torch.Tensor]:
        """One bucket of the weights as the rollout engines take them (ZeRO-0/1/2), under the
        checkpoint's names: with LoRA merged afresh for this bucket alone; else the module's own
        tensors, cloned when ``owned`` (under ZeRO-1/2 parameters are views into one flat buffer, and
        pickling a view ships its whole storage: every bucket tensor must own exactly its bytes)."""
        own = {name: self._export_own()[name] for name in names}
        if self._lora:
            merged = lora.merged_state_dict(self.engine.module, set(own.values()))
            return {name: merged[o] for name, o in own.items()}
        state = self.engine.module.state_dict()
        return {name: state[o].clone() if owned else state[o] for name, o in own.items()}

    def weights_digest(self) -> str:
        """SHA-256 over all parameters (names and bytes): equal digests mean identical weights."""
        state = self._full_state_dict()
        digest = hashlib.sha256()
        for name in sorted(state):
            digest.update(name.encode())
            digest.update(state[name].float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def shutdown(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
