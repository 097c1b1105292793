"""The synthetic arithmetic task and the locally built tiny model."""

import json
import random

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipelines.tasks import arithmetic
from pipelines.tasks.tiny_model import SIZES, build_char_tokenizer


def test_checker_and_reward():
    assert arithmetic.check("37+45=", "82") == 1.0
    assert arithmetic.check("37+45=", " 82 ") == 1.0
    assert arithmetic.check("37+45=", "83") == 0.0
    assert arithmetic.check("not a prompt", "1") == 0.0
    assert arithmetic.reward(["1+1=", "2+2="], ["2", "5"]) == [1.0, 0.0]


def test_wrong_answers_are_wrong():
    rng = random.Random(0)
    for a in range(0, 100, 7):
        for b in range(0, 100, 11):
            problem = arithmetic.Problem(a, b)
            assert arithmetic.wrong_answer(problem, rng, 198) != problem.answer


def test_datasets_split_disjoint(task_data):
    train = set(pq.read_table(task_data["pairs_train"]).column("prompt").to_pylist())
    held_out = set(pq.read_table(task_data["pairs_eval"]).column("prompt").to_pylist())
    assert train and held_out and not train & held_out
    sft = pq.read_table(task_data["sft_train"]).to_pylist()
    assert all(arithmetic.check(r["prompt"], r["response"]) == 1.0 for r in sft)
    pairs = pq.read_table(task_data["pairs_eval"]).to_pylist()
    assert all(arithmetic.check(r["prompt"], r["chosen"]) == 1.0 and arithmetic.check(r["prompt"], r["rejected"]) == 0.0
               for r in pairs)


def test_char_tokenizer_round_trip():
    tok = build_char_tokenizer()
    ids = tok("37+45=82")["input_ids"]
    assert len(ids) == 8 and tok.decode(ids) == "37+45=82"
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "37+45=82"


def test_tiny_model_is_vllm_shaped_and_safetensors(tiny_model_dir):
    files = {p.name for p in tiny_model_dir.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 64  # vLLM CPU needs head_dim 64
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.vocab_size >= len(tok)
    out = model(input_ids=torch.tensor([tok("1+2=")["input_ids"]])).logits
    assert out.shape[-1] == model.config.vocab_size and torch.isfinite(out).all()


def test_sizes_keep_head_dim_64():
    assert all(s.hidden_size // s.num_attention_heads == 64 for s in SIZES.values())
