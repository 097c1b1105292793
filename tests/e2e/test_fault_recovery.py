"""A rollout worker killed (SIGKILL, by pid) in the middle of an on-policy stage is replaced inside the
stage: it gets the served weight version pushed and verified, the chunks it held are generated again,
and the stage finishes with exactly the samples and metrics of an uninterrupted run with the same seed."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import validate_pipeline
from orchestrator.runner import run_pipeline
from tests.e2e.mlflow_reads import metric_history

ITERATIONS = 3


def _pipeline(tmp_path: Path, name: str) -> dict:
    return {
        "name": name, "run_dir": str(tmp_path / "runs"),
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "log_checkpoints": False},
        "stages": [
            {"name": "task", "kind": "synthetic_task", "num_sft": 16, "num_pairs": 16, "num_prompts": 64,
             "num_eval": 16},
            {"name": "dpo", "kind": "onpolicy_dpo", "policy": {"from": "task"},
             # a reward the untrained model's samples differ on, so every iteration trains and syncs
             "reward": {"function": "pipelines.tasks.arithmetic:terse"},
             "data": {"train": {"from": "task", "output": "prompts_train"}, "max_prompt_length": 16},
             "sampling": {"samples_per_prompt": 4, "max_new_tokens": 8},
             "schedule": {"iterations": ITERATIONS, "prompts_per_iteration": 32, "pairs_per_update": 8,
                          "pairs_per_microbatch": 8},
             "optim": {"lr": 1.0e-3}, "eval": {"table_rows": 0}, "checkpoint": {"every": 0},
             "trainer": {"cpus_per_worker": 0.5}, "reference_group": {"cpus_per_worker": 0.25},
             "reward_group": {"cpus_per_worker": 0.25},
             "rollout": {"cpus_per_worker": 1, "max_model_len": 64, "kv_cache_gib": 1,
                         "prompts_per_chunk": 8}},
        ],
    }


class RolloutKiller(threading.Thread):
    """Watch the rollout worker's process title (Ray names the running method in it); after its first
    weight sync, SIGKILL it while it generates (the next iteration's rollout)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.killed: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        proc, synced = None, False
        deadline = time.monotonic() + 600
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                if proc is None:
                    proc = next((p for p in psutil.Process().children(recursive=True)
                                 if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::RolloutWorker")), None)
                    if proc is None:
                        raise psutil.NoSuchProcess(0)
                title = proc.cmdline()[0] if proc.cmdline() else ""
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                proc = None
                time.sleep(0.05)
                continue
            synced = synced or "receive_bucket" in title
            if synced and "generate_chunk" in title:
                os.kill(proc.pid, signal.SIGKILL)  # a process the test's own Ray instance started
                self.killed = title
                return
            time.sleep(0.001)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _run(tmp_path: Path, name: str) -> tuple[dict[str, list[float]], MlflowClient, str]:
    result = run_pipeline(validate_pipeline(_pipeline(tmp_path, name)), quiet=True)
    client = MlflowClient(result.tracking_uri)
    stage = result.stages[1]
    return metric_history(client, stage.run_id), client, stage.run_id


def test_a_rollout_worker_killed_mid_generation_is_replaced_and_the_stage_matches(ray_local, tmp_path):
    clean, _, _ = _run(tmp_path, "clean")

    killer = RolloutKiller()
    killer.start()
    faulty, client, run_id = _run(tmp_path, "faulty")
    killer.stop.set()
    assert killer.killed is not None, "the rollout worker was never seen generating after a sync"

    assert faulty["faults/restarts/rollout"] == [1.0]
    run = client.get_run(run_id)
    (tag,) = [v for k, v in run.data.tags.items() if k.startswith("rlhf.fault.")]
    assert tag.startswith("role=rollout rank=0") and "phase=rollout iteration=" in tag and "iteration=1 " not in tag
    parent = run.data.tags["mlflow.parentRunId"]
    experiment = client.get_run(parent).info.experiment_id
    assert len(client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")) == 2  # task, dpo

    # Every iteration ran once, the replacement served the right weights, and since each prompt's
    # samples depend only on the seed and the weights, the stage equals the uninterrupted one.
    assert len(faulty["objective/scores"]) == ITERATIONS
    assert max(faulty["sync/logprob_max_abs_diff"]) <= 1e-3
    for name in ("objective/scores", "pairs/count", "objective/kl", "loss"):
        assert faulty[name] == pytest.approx(clean[name], abs=1e-5), name
