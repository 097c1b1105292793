"""Small helpers the benchmark scripts share."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(path: str | Path | None, res: dict) -> None:
    """The results as JSON at ``path`` (nothing without one), its folder made if needed."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(res, indent=1))


def greedy_responses(model_dir: str, prompts_path: str, max_new_tokens: int) -> tuple[list[str], list[str]]:
    """(prompts, greedy responses) of a causal-LM checkpoint on a prompts file, with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.modeling import greedy_generate
    from pipelines.data.sources import read_columns
    from pipelines.data.tokens import pad_token_id

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = read_columns(prompts_path, ["prompt"], "prompts")["prompt"]
    ids = tok(texts, add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        out = greedy_generate(model, ids, max_new_tokens=max_new_tokens, pad_id=pad_token_id(tok),
                              eos_id=tok.eos_token_id, device=torch.device("cpu"))
    return texts, tok.batch_decode(out, skip_special_tokens=True)


def exact_match(model_dir: str, prompts_path: str, max_new_tokens: int,
                checker: str = "pipelines.tasks.arithmetic:reward") -> float:
    """Share of held-out prompts whose greedy response the checker scores >= 1."""
    from pipelines.data.rewards import FunctionReward

    texts, responses = greedy_responses(model_dir, prompts_path, max_new_tokens)
    scores = FunctionReward(checker).score(texts, responses)
    return sum(s >= 1.0 for s in scores) / len(scores)
