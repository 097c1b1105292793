"""vLLM serving a LoRA policy two ways, side by side: merged weights, or the base model plus the
adapter (``enable_lora`` and a ``LoRARequest``).

One model (``--size``) gets LoRA adapters of ``--rank`` on every attention and MLP projection, with
random B (as if trained). They are saved twice: as the merged HF checkpoint that the trainer pushes
to the rollout workers (``actors.lora.merged_state_dict``), and as a PEFT adapter. Each way runs
in a fresh process with its own vLLM engine. Each generates the same seeded batch (``--prompts``
prompts × 4 samples × 16 tokens) after one warm-up call. Reported per way:

- generation wall time;
- the bytes a weight sync would move (the merged model, or the adapter alone);
- the log-probs of the first sampled tokens. The two ways must agree.

    .venv/bin/python bench/vllm_lora_vs_merged.py --size 85m --out bench/out/vllm_lora.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(work: Path, size: str, rank: int) -> dict[str, int]:
    """Base model, merged checkpoint and adapter under ``work``; returns the bytes of each sync."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors import lora
    from pipelines.tasks.tiny_model import build_tiny_model

    base = build_tiny_model(work / "base", size=size)
    model = lora.wrap(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                      {"rank": rank, "alpha": 2.0 * rank, "dropout": 0.0, "target_modules": TARGETS})
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.save_pretrained(str(work / "adapter"))
    merged = lora.merged_state_dict(model)
    model.get_base_model().save_pretrained(str(work / "merged"), state_dict=merged)
    AutoTokenizer.from_pretrained(base).save_pretrained(str(work / "merged"))
    adapter = lora.adapter_state_dict(model)
    return {"merged": sum(t.numel() * t.element_size() for t in merged.values()),
            "adapter": sum(t.numel() * t.element_size() for t in adapter.values())}


PROBE = """
import json, os, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
work, way, rank, n = {work!r}, {way!r}, {rank}, {prompts}
prompts = [TokensPrompt(prompt_token_ids=[1] + [5 + (i * 7 + j) % 40 for j in range(12)]) for i in range(n)]
params = SamplingParams(n=4, max_tokens=16, temperature=1.0, seed=0, logprobs=0, ignore_eos=True)
common = dict(dtype="float32", max_model_len=64, enforce_eager=True, seed=0)
if way == "merged":
    llm, extra = LLM(model=work + "/merged", **common), {{}}
else:
    from vllm.lora.request import LoRARequest
    llm = LLM(model=work + "/base", enable_lora=True, max_lora_rank=rank, max_loras=1, **common)
    extra = {{"lora_request": LoRARequest("policy", 1, work + "/adapter")}}
llm.generate(prompts[:4], params, use_tqdm=False, **extra)
start = time.perf_counter()
out = llm.generate(prompts, params, use_tqdm=False, **extra)
seconds = time.perf_counter() - start
first = [c.logprobs[0][c.token_ids[0]].logprob for o in out for c in o.outputs]
print("RESULT " + json.dumps({{"generate_s": seconds, "tokens": sum(len(c.token_ids) for o in out for c in o.outputs),
                              "first_logprobs": first}}))
"""


def serve(work: Path, way: str, rank: int, prompts: int) -> dict:
    code = PROBE.format(work=str(work), way=way, rank=rank, prompts=prompts)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="85m", choices=["tiny", "mini", "small", "85m"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sync_bytes = build(work, args.size, args.rank)
        ways = {way: serve(work, way, args.rank, args.prompts) for way in ("merged", "adapter")}
    diff = max(abs(a - b) for a, b in zip(ways["merged"]["first_logprobs"], ways["adapter"]["first_logprobs"],
                                          strict=True))
    report = {"size": args.size, "rank": args.rank, "prompts": args.prompts,
              "ways": {w: {"generate_s": r["generate_s"], "tokens": r["tokens"], "sync_bytes": sync_bytes[w]}
                       for w, r in ways.items()},
              "first_logprob_max_abs_diff": diff,
              "adapter_over_merged_generate": ways["adapter"]["generate_s"] / ways["merged"]["generate_s"]}
    write_result(args.out, report)
    print("| way | generate s | tokens | sync MiB |")
    print("|---|---|---|---|")
    for way, r in report["ways"].items():
        print(f"| {way} | {r['generate_s']:.2f} | {r['tokens']} | {r['sync_bytes'] / 2**20:.1f} |")
    print(f"adapter / merged generation time: {report['adapter_over_merged_generate']:.2f}x; "
          f"first-token log-prob max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
