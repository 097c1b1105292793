"""LoRA end to end: SFT trains only adapters (a fraction of the weights) and still learns; its
output is the merged HF checkpoint plus the adapter; on-policy DPO with LoRA pushes merged weights
to vLLM, which serves them with the same log-prob parity as full weights; in-stage checkpoints hold
the adapters only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from orchestrator.config import validate_pipeline
from orchestrator.runner import run_pipeline

# every linear layer, the output head too: on a randomly initialised model the frozen head would
# cap what adapters can learn
LORA = {"rank": 8, "alpha": 16.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj", "lm_head"]}


def _pipeline(tmp_path: Path) -> dict:
    return {
        "name": "lora", "run_dir": str(tmp_path / "runs"),
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "log_checkpoints": False},
        "stages": [
            {"name": "task", "kind": "synthetic_task", "num_sft": 512, "num_prompts": 64, "num_eval": 16},
            {"name": "sft", "kind": "sft", "policy": {"from": "task"},
             "data": {"train": {"from": "task", "output": "sft_train"}, "eval": {"from": "task", "output": "sft_eval"}},
             "schedule": {"steps": 40, "sequences_per_step": 32, "sequences_per_microbatch": 32},
             "optim": {"lr": 5.0e-3, "warmup_steps": 5}, "checkpoint": {"every": 20},
             "trainer": {"cpus_per_worker": 1, "lora": LORA}, "generation": {"enabled": False}},
            {"name": "dpo", "kind": "onpolicy_dpo", "policy": {"from": "sft"},
             "reward": {"function": "pipelines.tasks.arithmetic:terse"},
             "data": {"train": {"from": "task", "output": "prompts_train"}, "max_prompt_length": 16},
             "sampling": {"samples_per_prompt": 4, "max_new_tokens": 8},
             "schedule": {"iterations": 3, "prompts_per_iteration": 32, "pairs_per_update": 8,
                          "pairs_per_microbatch": 8},
             "optim": {"lr": 1.0e-3}, "eval": {"table_rows": 0}, "checkpoint": {"every": 1},
             "trainer": {"cpus_per_worker": 0.5, "lora": LORA}, "reference_group": {"cpus_per_worker": 0.25},
             "reward_group": {"cpus_per_worker": 0.25},
             "rollout": {"cpus_per_worker": 1, "max_model_len": 64, "kv_cache_gib": 1}},
        ],
    }


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_lora_sft_then_onpolicy_dpo(ray_local, tmp_path):
    result = run_pipeline(validate_pipeline(_pipeline(tmp_path)), quiet=True)
    stages = {s.name: s for s in result.stages}
    client = MlflowClient(result.tracking_uri)
    params = client.get_run(stages["sft"].run_id).data.params
    total, trainable = int(params["policy_trainer.params"]), int(params["policy_trainer.trainable_params"])
    assert 0 < trainable < total / 4

    sft = stages["sft"]
    start, end = sft.first_last("eval/loss")
    assert end < 0.7 * start  # adapters alone learn

    # The output: the merged model (loads as a plain HF model) and the adapter beside it.
    out = Path(sft.outputs["model"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == LORA["rank"]
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(stages["task"].outputs["model"], dtype=torch.float32)
    moved = max((merged.state_dict()[k] - v).abs().max().item() for k, v in base.state_dict().items())
    assert moved > 1e-3 and set(merged.state_dict()) == set(base.state_dict())

    # On-policy with LoRA: vLLM serves the merged weights with full-weight parity.
    dpo = stages["dpo"]
    assert max(v for _, v in dpo.metrics["sync/logprob_max_abs_diff"]) <= 1e-3
    assert max(v for _, v in dpo.metrics["rollout/logprob_gap_max"]) <= 1e-3
    assert len(dpo.metrics["sync/bytes"]) >= 1
    # In-stage checkpoints hold the adapters, not the base weights.
    (weights,) = (Path(result.run_dir) / "stages" / "dpo" / "checkpoint").glob("*/weights.safetensors")
    saved = load_file(str(weights))
    assert saved and all(".lora_" in name for name in saved)
    assert sum(t.numel() for t in saved.values()) == trainable
    print("lora:", json.dumps({"params": total, "trainable": trainable, "sft eval/loss": [start, end],
                               "sync bytes": dpo.metrics["sync/bytes"][-1][1],
                               "parity": max(v for _, v in dpo.metrics["sync/logprob_max_abs_diff"])}))
