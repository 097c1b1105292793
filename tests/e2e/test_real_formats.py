"""Real users' data on a real tokenizer: the task written as conversational JSON Lines (and as an
implicit-prompt file) for a model with a byte-level BPE tokenizer and a ChatML template; SFT on
`messages`, offline DPO on conversational and on implicit-prompt pairs, on-policy DPO from
conversational prompts. Every stage learns; the rollout samples from exactly the tokens the chat
template gives and the trainer scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from orchestrator.config import validate_pipeline
from orchestrator.runner import run_pipeline
from pipelines.data.formats import read_prompts
from pipelines.data.lengths import LengthTally
from pipelines.stages.online_rollout import load_prompts


def _task(name: str, data_format: str) -> dict:
    # operands up to 20: a task the tiny model learns something of within a test's few steps
    return {"name": name, "kind": "synthetic_task", "tokenizer": "bpe", "data_format": data_format,
            "file_type": "jsonl", "max_operand": 20, "num_sft": 1024, "num_pairs": 1024, "num_prompts": 64,
            "num_eval": 64}


def _dpo(name: str, task: str) -> dict:
    return {"name": name, "kind": "offline_dpo", "policy": {"from": "sft"},
            "data": {"train": {"from": task, "output": "pairs_train"}, "eval": {"from": task, "output": "pairs_eval"}},
            "schedule": {"steps": 80, "pairs_per_step": 32, "pairs_per_microbatch": 32},
            "optim": {"lr": 1.0e-3}, "generation": {"enabled": False}, "checkpoint": {"every": 0},
            "trainer": {"cpus_per_worker": 1}, "reference_group": {"cpus_per_worker": 1}}


def _pipeline(tmp_path: Path) -> dict:
    return {
        "name": "formats", "run_dir": str(tmp_path / "runs"),
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "log_checkpoints": False},
        "stages": [
            _task("task", "conversational"), _task("task_implicit", "implicit_prompt"),
            {"name": "sft", "kind": "sft", "policy": {"from": "task"},
             "data": {"train": {"from": "task", "output": "sft_train"}, "eval": {"from": "task", "output": "sft_eval"}},
             "schedule": {"steps": 100, "sequences_per_step": 32, "sequences_per_microbatch": 32},
             "optim": {"lr": 2.0e-3, "warmup_steps": 5}, "checkpoint": {"every": 0}, "trainer": {"cpus_per_worker": 1},
             "generation": {"checker": "pipelines.tasks.arithmetic:reward", "max_new_tokens": 4}},
            _dpo("dpo_conversational", "task"), _dpo("dpo_implicit", "task_implicit"),
            {"name": "onpolicy", "kind": "onpolicy_dpo", "policy": {"from": "sft"},
             "reward": {"function": "pipelines.tasks.arithmetic:reward"},
             "data": {"train": {"from": "task", "output": "prompts_train"},
                      "eval": {"from": "task", "output": "prompts_eval"}, "max_prompt_length": 24},
             "sampling": {"samples_per_prompt": 4, "max_new_tokens": 4},
             "schedule": {"iterations": 3, "prompts_per_iteration": 16, "pairs_per_update": 8,
                          "pairs_per_microbatch": 8},
             "optim": {"lr": 1.0e-4}, "eval": {"checker": "pipelines.tasks.arithmetic:reward", "table_rows": 0},
             "checkpoint": {"every": 0},
             "trainer": {"cpus_per_worker": 0.5}, "reference_group": {"cpus_per_worker": 0.25},
             "reward_group": {"cpus_per_worker": 0.25},
             "rollout": {"cpus_per_worker": 1, "max_model_len": 64, "kv_cache_gib": 1}},
        ],
    }


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_conversational_and_implicit_prompt_jsonl_on_a_bpe_tokenizer(ray_local, tmp_path):
    result = run_pipeline(validate_pipeline(_pipeline(tmp_path)), quiet=True)
    stages = {s.name: s for s in result.stages}
    task = stages["task"].outputs

    # The data is what a user brings: conversations in JSON Lines, the implicit file without a prompt.
    first = json.loads(Path(task["pairs_train"]).read_text().splitlines()[0])
    assert first["prompt"][0]["role"] == "user" and first["chosen"][0]["role"] == "assistant"
    implicit = json.loads(Path(stages["task_implicit"].outputs["pairs_train"]).read_text().splitlines()[0])
    assert set(implicit) == {"chosen", "rejected"}

    # A real BPE tokenizer with a chat template; rollout prompts are its rendering with the generation prompt.
    tok = AutoTokenizer.from_pretrained(task["model"])
    assert len(tok) == 512 and tok.eos_token == "<|im_end|>"
    prompts = load_prompts(task["prompts_eval"], tok, "prompt",
                           LengthTally.strict(task["prompts_eval"], 24))
    conversation = read_prompts(task["prompts_eval"])[0]
    assert tok.decode(prompts.ids[0]) == tok.apply_chat_template(conversation, tokenize=False,
                                                                  add_generation_prompt=True)

    sft, onpolicy = stages["sft"], stages["onpolicy"]
    numbers = {"sft eval/loss": sft.first_last("eval/loss"), "sft eval/exact_match": sft.first_last("eval/exact_match"),
               "onpolicy eval/reward_mean": onpolicy.first_last("eval/reward_mean")}
    for name in ("dpo_conversational", "dpo_implicit"):
        numbers[f"{name} eval/rewards/accuracies"] = stages[name].first_last("eval/rewards/accuracies")
        numbers[f"{name} eval/loss"] = stages[name].first_last("eval/loss")
    print("formats:", json.dumps(numbers))

    assert numbers["sft eval/loss"][1] < 0.5 * numbers["sft eval/loss"][0]
    for name in ("dpo_conversational", "dpo_implicit"):  # held-out pairs, never trained on
        (acc_start, acc_end), (loss_start, loss_end) = (numbers[f"{name} eval/rewards/accuracies"],
                                                        numbers[f"{name} eval/loss"])
        assert acc_start == 0.0 and acc_end >= 0.6 and loss_end < loss_start - 0.05, (name, numbers)
    # both offline stages read the same pairs, once with and once without a prompt field
    assert numbers["dpo_implicit eval/loss"] == pytest.approx(numbers["dpo_conversational eval/loss"], abs=1e-5)

    assert max(v for _, v in onpolicy.metrics["sync/logprob_max_abs_diff"]) <= 1e-3
    # vLLM's and the trainer's log-probs of the sampled tokens: the same tokens, the same model
    assert max(v for _, v in onpolicy.metrics["rollout/logprob_gap_max"]) <= 1e-3
    assert min(v for _, v in onpolicy.metrics["rollout/response_length_mean"]) >= 1.0
