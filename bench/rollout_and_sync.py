"""Rollout throughput through the product path vs plain ``transformers.generate``, and weight-sync
cost vs model size, measured side by side in one run.

Rollout: the same locally built model (``--size``, default ``85m``), the same prompts (``--batch``,
default 64), exactly ``--new-tokens`` (default 128) sampled tokens per prompt on both sides (vLLM
``ignore_eos``; transformers ``min_new_tokens``), fp32 on CPU, temperature 1.0.

  ours          RolloutWorker in a Ray actor (vLLM engine created once, not timed), called through
                ``orchestrator.runtime.rollout_ops.generate`` (balanced dispatch), results back in the driver.
  raw vLLM      ``LLM.generate`` in a fresh child process (no Ray), same engine settings: the
                ceiling the product path can reach.
  transformers  ``model.generate`` in this process with the same thread count, KV cache on, batched.

Weight sync: a one-rank DeepSpeed trainer group pushes its weights to one rollout worker
(``WeightSync.push``, then ``verify`` on a probe) over both transports (Ray object store; gloo
broadcast group), for the tiny and the chosen model size.

Every timing is the median of ``--repeats`` runs after one warm-up run.

    .venv/bin/python bench/rollout_and_sync.py                       # 85m, batch 64, 128 tokens
    .venv/bin/python bench/rollout_and_sync.py --size tiny --batch 16 --new-tokens 16   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def prompts_for(tokenizer, batch: int) -> list[list[int]]:
    return [tokenizer(f"{i % 50}+{(7 * i) % 50}=")["input_ids"] for i in range(batch)]


def bench_transformers(model_dir: str, prompts: list[list[int]], new_tokens: int, threads: int, repeats: int) -> float:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    seconds, out = timed(run, repeats)
    assert out.shape[1] - width == new_tokens
    return seconds


def _raw_vllm_child(model_dir: str, prompts: list[list[int]], new_tokens: int, threads: int, repeats: int,
                    queue) -> None:
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "2"
    torch.set_num_threads(threads)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_dir, dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    params = SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=0, ignore_eos=True, logprobs=0)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    seconds, _ = timed(lambda: llm.generate(inputs, params, use_tqdm=False), repeats)
    queue.put(seconds)


def bench_raw_vllm(model_dir: str, prompts: list[list[int]], new_tokens: int, threads: int, repeats: int,
                   env: dict[str, str]) -> float:
    import multiprocessing as mp
    import os

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # a spawned child inherits the environment at start (LD_PRELOAD included)
    try:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_raw_vllm_child, args=(model_dir, prompts, new_tokens, threads, repeats, queue))
        child.start()
        seconds = queue.get()
        child.join()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="85m")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preload-iomp", action="store_true",
                        help="LD_PRELOAD the environment's Intel OpenMP into the engines (vLLM-CPU suggests it)")
    parser.add_argument("--out", default="bench/out/rollout_and_sync.json")
    args = parser.parse_args()

    import ray
    from transformers import AutoTokenizer

    from actors.policy_trainer import PolicyTrainer, TrainerSpec
    from actors.rollout import RolloutWorker, SamplingSpec
    from orchestrator.runtime.actor_group import ActorGroup
    from orchestrator.runtime.resources import WorkerResources
    from orchestrator.runtime.rollout_ops import generate
    from orchestrator.runtime.weight_sync import WeightSync
    from pipelines.tasks.tiny_model import build_tiny_model

    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    env = {"LD_PRELOAD": str(iomp)} if args.preload_iomp and iomp.is_file() else {}

    work = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    sizes = sorted({"tiny", args.size}, key=lambda s: s != "tiny")
    dirs = {s: str(build_tiny_model(work / s, size=s, seed=0, max_position_embeddings=256)) for s in sizes}
    tok = AutoTokenizer.from_pretrained(dirs[args.size])
    prompts = prompts_for(tok, args.batch)
    results: dict[str, object] = {"size": args.size, "batch": args.batch, "new_tokens": args.new_tokens,
                                  "threads": args.threads}

    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    sync_rows = []
    for size in sizes:
        rollout = ActorGroup("rollout", RolloutWorker, 1, WorkerResources(args.threads / 2, 0.0), dirs[size],
                             max_model_len=256, dtype="float32", kv_cache_gib=2, num_threads=args.threads, env_vars=env)
        start = time.perf_counter()
        rollout.broadcast(RolloutWorker.setup)
        engine_s = time.perf_counter() - start
        if size == args.size:
            sampling = SamplingSpec(max_new_tokens=args.new_tokens, temperature=1.0, seed=0, ignore_eos=True)
            ours_s, samples = timed(lambda: generate(rollout, prompts, sampling, prompts_per_chunk=args.batch),
                                    args.repeats)
            assert all(len(s.response_ids) == args.new_tokens for s in samples)
            results["engine_start_s"] = engine_s
            results["ours_tokens_per_s"] = args.batch * args.new_tokens / ours_s
        spec = TrainerSpec(model_path=dirs[size], total_steps=1, examples_per_step=1, examples_per_microbatch=1,
                           lr=1e-5, num_threads=1)
        trainer = ActorGroup("policy_trainer", PolicyTrainer, 1, WorkerResources(args.threads / 2, 0.0), spec)
        addr, port = trainer.rank0(PolicyTrainer.open_rendezvous)
        trainer.broadcast(PolicyTrainer.setup, addr, port)
        for transport in ("object_store", "collective"):
            sync = WeightSync(trainer, rollout, pad_id=tok.pad_token_id, transport=transport,
                              version=rollout.rank0(RolloutWorker.served_version))
            push_s, metrics = timed(sync.push, args.repeats)  # the warm-up opens the collective group
            parity = sync.verify([(prompts[0], prompts[1])])
            sync_rows.append({"size": size, "transport": transport, "bytes": metrics["sync/bytes"],
                              "buckets": metrics["sync/buckets"], "sync_s": push_s, **parity})
        trainer.shutdown()
        rollout.shutdown()
    ray.shutdown()

    raw_s = bench_raw_vllm(dirs[args.size], prompts, args.new_tokens, args.threads, args.repeats, env)
    results["raw_vllm_tokens_per_s"] = args.batch * args.new_tokens / raw_s
    hf_s = bench_transformers(dirs[args.size], prompts, args.new_tokens, args.threads, args.repeats)
    results["transformers_tokens_per_s"] = args.batch * args.new_tokens / hf_s
    results["ratio_ours_over_transformers"] = results["ours_tokens_per_s"] / results["transformers_tokens_per_s"]
    results["ratio_raw_vllm_over_transformers"] = (results["raw_vllm_tokens_per_s"]
                                                   / results["transformers_tokens_per_s"])
    results["sync"] = sync_rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
