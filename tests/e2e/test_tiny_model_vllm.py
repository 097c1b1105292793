"""The locally built tiny model loads in the real vLLM (CPU build here) and agrees with transformers."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.modeling import token_logprobs

PROBE = Path(__file__).with_name("vllm_probe.py")


def test_vllm_generates_and_matches_transformers_logprobs(tiny_model_dir, tmp_path):
    prompts = ["37+45=", "1+2="]
    proc = subprocess.run([sys.executable, str(PROBE), str(tiny_model_dir), *prompts], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for prompt, r in zip(prompts, results):
        assert r["prompt_ids"] == tok(prompt)["input_ids"]  # same tokenizer on both sides
        assert r["ids"] and r["finish"] in ("stop", "length")
        ids = torch.tensor([r["prompt_ids"] + r["ids"]])
        with torch.no_grad():
            hf = token_logprobs(model, ids, torch.ones_like(ids))[0, len(r["prompt_ids"]) - 1 :]
        assert torch.allclose(hf, torch.tensor(r["logprobs"]), atol=1e-3), (hf.tolist(), r["logprobs"])
        # Greedy: each generated token is the transformers argmax too.
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(r["prompt_ids"]) - 1 : -1]
        assert logits.argmax(-1).tolist() == r["ids"][: logits.shape[0]]
