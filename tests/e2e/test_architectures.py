"""The architecture matrix: for each architecture ``init_model`` builds (pipelines/tasks/architectures.py),
a tiny model with a BPE tokenizer trained on the HH-style sample, then SFT → offline DPO → on-policy
DPO with LoRA on the family's own module names, in one pipeline run. The rollout engine (real vLLM)
must match the trainer's log-probs within 1e-3 after every weight sync (``verify_every: 1``: a larger
gap fails the sync), on sequences longer than the sliding window where the family has one.

The default tier runs the families furthest from Llama (Gemma 2: soft-capped logits, alternating
sliding windows, tied and scaled embeddings; GPT-2: learned positions, ``Conv1D`` layers, biases,
tied embeddings); the slow tier runs all nine (``make test-all``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import validate_pipeline
from orchestrator.runner import run_pipeline
from pipelines.tasks.architectures import ARCHITECTURES

SAMPLE = Path(__file__).resolve().parents[2] / "pipelines" / "samples" / "hh_style"
DEFAULT_TIER = ("gemma2", "gpt2")
POSITIONS = 256  # sliding windows of positions // 2 = 128 tokens: prompts of up to 160 + 16 new tokens cross them


def _stages(arch: str) -> list[dict]:
    train, held_out = str(SAMPLE / "train.jsonl"), str(SAMPLE / "eval.jsonl")
    no_checkpoints = {"every": 0}
    return [
        {"name": "base", "kind": "init_model", "architecture": arch, "size": "tiny",
         "max_position_embeddings": POSITIONS, "tokenizer": {"train_files": [held_out], "vocab_size": 512}},
        {"name": "sft", "kind": "sft", "policy": {"from": "base"},
         "data": {"train": held_out, "eval": held_out, "max_length": 160, "eval_examples": 16},
         "generation": {"enabled": False}, "optim": {"lr": 2.0e-3},
         "schedule": {"steps": 8, "sequences_per_step": 8, "sequences_per_microbatch": 8},
         "checkpoint": no_checkpoints, "trainer": {"cpus_per_worker": 1}},
        {"name": "dpo", "kind": "offline_dpo", "policy": {"from": "sft"},
         "data": {"train": held_out, "eval": held_out, "max_length": 160, "eval_pairs": 16},
         "schedule": {"steps": 3, "pairs_per_step": 8, "pairs_per_microbatch": 8}, "optim": {"lr": 1.0e-3},
         "checkpoint": no_checkpoints, "trainer": {"cpus_per_worker": 1}},
        {"name": "onpolicy", "kind": "onpolicy_dpo", "policy": {"from": "dpo"},
         "reward": {"function": "pipelines.tasks.hh_style:reward"},
         "data": {"train": train, "eval": held_out, "max_prompt_length": 160, "eval_prompts": 8},
         "sampling": {"samples_per_prompt": 2, "max_new_tokens": 16},
         "schedule": {"iterations": 2, "prompts_per_iteration": 8, "pairs_per_update": 4, "pairs_per_microbatch": 4},
         "optim": {"lr": 1.0e-4}, "eval": {"table_rows": 0}, "checkpoint": no_checkpoints,
         "trainer": {"cpus_per_worker": 0.5,
                     "lora": {"rank": 4, "target_modules": list(ARCHITECTURES[arch].lora_targets)}},
         "rollout": {"max_model_len": POSITIONS, "kv_cache_gib": 1,
                     "weight_sync": {"verify_every": 1, "tolerance": 1.0e-3}}},
    ]


@pytest.mark.parametrize("arch", [a if a in DEFAULT_TIER else pytest.param(a, marks=pytest.mark.slow)
                                  for a in ARCHITECTURES])
def test_architecture_trains_and_serves_the_same_weights(arch, ray_local, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = {"name": f"arch_{arch}", "run_dir": str(tmp_path / "runs"),
           "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "log_checkpoints": False}, "stages": _stages(arch)}
    result = run_pipeline(validate_pipeline(raw), quiet=True)
    stages = {s.name: s for s in result.stages}

    built = json.loads((Path(stages["base"].outputs["model"]) / "init_model.json").read_text())
    assert built["architecture"] == arch and built["tied_embeddings"] == ARCHITECTURES[arch].tied
    config = json.loads((Path(stages["base"].outputs["model"]) / "config.json").read_text())
    assert config["tie_word_embeddings"] == ARCHITECTURES[arch].tied

    sft_loss = stages["sft"].first_last("eval/loss")
    assert sft_loss is not None and sft_loss[1] < sft_loss[0] - 0.5, sft_loss  # it learns the text
    params = MlflowClient(result.tracking_uri).get_run(stages["sft"].run_id).data.params
    assert int(params["data.train.rows_truncated"]) > 0  # long rows were cut, not refused

    syncs = stages["onpolicy"].metrics["sync/logprob_max_abs_diff"]
    assert len(syncs) >= 2 and max(v for _, v in syncs) <= 1e-3, syncs  # every sync verified, LoRA merged
    print(f"ARCH {arch} parameters={built['parameters']} tied={built['tied_embeddings']} "
          f"lora={','.join(ARCHITECTURES[arch].lora_targets)} sync_max={max(v for _, v in syncs):.2e} "
          f"sft_eval_loss={sft_loss[0]:.3f}->{sft_loss[1]:.3f}")
