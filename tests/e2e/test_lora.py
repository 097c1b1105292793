"""LoRA end to end: SFT trains only adapters (a fraction of the weights) and still learns; its
output is the merged HF checkpoint plus the adapter; a LoRA reward model (adapters + score head)
learns and its merged checkpoint scores as logged; on-policy DPO with LoRA pushes merged weights
to vLLM, which serves them with the same log-prob parity as full weights, and takes its reference
log-probs from the trainer with the adapters disabled (no reference group); in-stage checkpoints
hold the adapters only."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.modeling import preference_logps
from actors.reward import build_reward
from orchestrator.config import validate_pipeline
from orchestrator.runner import run_pipeline
from pipelines.data.formats import PAIR_FIELDS, pair_texts, read_pairs
from pipelines.data.sources import read_columns
from pipelines.data.tokens import collate_pairs, tokenize_pairs

# every linear layer, the output head too: on a randomly initialised model the frozen head would
# cap what adapters can learn
LORA = {"rank": 8, "alpha": 16.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj", "lm_head"]}


LORA_RM = {"rank": 8, "alpha": 16.0, "target_modules": "all-linear"}  # the score head trains whole beside them


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
            {"name": "rm", "kind": "reward_model", "model": {"from": "sft"},
             "data": {"train": {"from": "task", "output": "pairs_train"},
                      "eval": {"from": "task", "output": "pairs_eval"}},
             "schedule": {"steps": 30, "pairs_per_step": 16, "pairs_per_microbatch": 16, "eval_every": 30},
             "optim": {"lr": 3.0e-3, "warmup_steps": 3}, "trainer": {"cpus_per_worker": 1, "lora": LORA_RM}},
            {"name": "offline", "kind": "offline_dpo", "policy": {"from": "sft"},
             "data": {"train": {"from": "task", "output": "pairs_train"},
                      "eval": {"from": "task", "output": "pairs_eval"}},
             "schedule": {"steps": 10, "pairs_per_step": 16, "pairs_per_microbatch": 16},
             "optim": {"lr": 2.0e-3}, "trainer": {"cpus_per_worker": 1, "lora": LORA}},
            {"name": "dpo", "kind": "onpolicy_dpo", "policy": {"from": "sft"},
             "reward": {"function": "pipelines.tasks.arithmetic:terse"},
             "data": {"train": {"from": "task", "output": "prompts_train"}, "max_prompt_length": 16},
             "sampling": {"samples_per_prompt": 4, "max_new_tokens": 8},
             "schedule": {"iterations": 3, "prompts_per_iteration": 32, "pairs_per_update": 8,
                          "pairs_per_microbatch": 8},
             "optim": {"lr": 1.0e-3}, "eval": {"table_rows": 0}, "checkpoint": {"every": 1},
             "trainer": {"cpus_per_worker": 0.5, "lora": LORA}, "reward_group": {"cpus_per_worker": 0.5},
             "rollout": {"cpus_per_worker": 1, "max_model_len": 64, "kv_cache_gib": 1}},
        ],
    }


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.mark.slow  # make test-all since 2026-12-01 (the default suite's budget); tests/unit/test_lora.py stays
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

    # A LoRA reward model trains, and its merged checkpoint (a plain classifier) scores as logged.
    rm = stages["rm"]
    rm_params = client.get_run(rm.run_id).data.params
    assert 0 < int(rm_params["reward_trainer.trainable_params"]) < int(rm_params["reward_trainer.params"]) / 4
    rm_start, rm_end = rm.first_last("eval/accuracy")  # 30 steps move a tiny model's RM little (fitting: unit tests)
    rows = read_columns(stages["task"].outputs["pairs_eval"], list(PAIR_FIELDS), "pairs")
    scorer = build_reward(model_path=rm.outputs["reward_model"])
    chosen = torch.tensor(scorer.score(rows["prompt"], rows["chosen"]))
    rejected = torch.tensor(scorer.score(rows["prompt"], rows["rejected"]))
    assert (chosen > rejected).float().mean().item() == pytest.approx(rm_end)
    assert (chosen - rejected).mean().item() == pytest.approx(rm.metrics["eval/margin"][-1][1], abs=1e-4)
    assert rm.metrics["eval/margin"][-1][1] != pytest.approx(rm.metrics["eval/margin"][0][1], abs=1e-3)  # it trained

    # Offline DPO with LoRA: the reference log-probs (computed once, cached) come from the trainer with
    # its adapters off, and equal the starting model's own; no reference group ran. (Ten steps from a
    # 40-step LoRA SFT move the held-out loss only a little: 0.6931 -> 0.6896 measured; a reference
    # group instead gives bit-identical metrics.)
    offline = stages["offline"]
    assert "rlhf.placement.reference" not in client.get_run(offline.run_id).data.tags
    cached = pq.read_table(Path(result.run_dir) / "stages" / "offline" / "ref_logps.parquet").to_pydict()
    tok = AutoTokenizer.from_pretrained(out)
    held_out = [i for i, name in enumerate(cached["set"]) if name == "eval"]
    texts = pair_texts(read_pairs(stages["task"].outputs["pairs_eval"], {}), tok, "eval")
    pairs = collate_pairs(tokenize_pairs(texts, tok, max_length=128, source="eval"), tok.pad_token_id)
    with torch.no_grad():
        want_chosen, want_rejected = preference_logps(merged.eval(), pairs)
    torch.testing.assert_close(torch.tensor([cached["chosen"][i] for i in held_out]), want_chosen, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor([cached["rejected"][i] for i in held_out]), want_rejected,
                               rtol=0, atol=1e-4)
    loss_start, loss_end = offline.first_last("eval/loss")
    assert loss_start == pytest.approx(0.6931, abs=1e-4) and loss_end < loss_start - 1e-3

    # On-policy with LoRA: vLLM serves the merged weights with full-weight parity.
    dpo = stages["dpo"]
    # The reference is the trainer with its adapters off: no reference group ran; at iteration 1
    # (fresh adapters) policy and reference agree, after updates they part.
    tags = client.get_run(dpo.run_id).data.tags
    assert "rlhf.placement.reference" not in tags and "rlhf.placement.policy_trainer" in tags
    kl = [v for _, v in dpo.metrics["objective/kl"]]
    assert abs(kl[0]) < 1e-5 and max(abs(k) for k in kl[1:]) > 1e-3, kl
    assert max(v for _, v in dpo.metrics["sync/logprob_max_abs_diff"]) <= 1e-3
    assert max(v for _, v in dpo.metrics["rollout/logprob_gap_max"]) <= 1e-3
    assert len(dpo.metrics["sync/bytes"]) >= 1
    # In-stage checkpoints hold the adapters, not the base weights.
    (weights,) = (Path(result.run_dir) / "stages" / "dpo" / "checkpoint").glob("*/weights.safetensors")
    saved = load_file(str(weights))
    assert saved and all(".lora_" in name for name in saved)
    assert sum(t.numel() for t in saved.values()) == trainable
    print("lora:", json.dumps({"params": total, "trainable": trainable, "sft eval/loss": [start, end],
                               "sync bytes": dpo.metrics["sync/bytes"][-1][1], "rm eval/accuracy": [rm_start, rm_end],
                               "objective/kl": kl,
                               "offline eval/loss": [loss_start, loss_end],
                               "parity": max(v for _, v in dpo.metrics["sync/logprob_max_abs_diff"])}))
