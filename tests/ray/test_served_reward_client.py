"""The client of a served reward (``orchestrator/runtime/served.py``) against a real Ray Serve
application (``rlhf serve``'s reward app serving the task's checker): scores equal the checker's, the
calls and latency are counted, a killed replica costs a retry or a wait (never a wrong score), the
restart budget stops a stage that keeps losing replicas, and a missing application is refused before
anything runs. The whole-pipeline tests are in tests/e2e/test_served_reward.py (slow tier)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from actors.net import free_port
from orchestrator.runtime.faults import FaultError, FaultPolicy
from orchestrator.runtime.served import ServedReward
from pipelines.errors import ConfigError
from pipelines.tasks.arithmetic import reward as checker
from tests.e2e.killers import actor_titles

PROMPTS = [f"{a}+{b}=" for a in range(6) for b in range(4)]
RESPONSES = [str(a + b + (i % 3 == 0)) for i, (a, b) in enumerate((a, b) for a in range(6) for b in range(4))]


@pytest.fixture(scope="module")
def served(ray_local):
    from ray import serve

    from deploy.serve_app import start

    start("pipelines.tasks.arithmetic:reward", reward_name="rm", reward_cpus=0.1, port=free_port())
    yield
    serve.shutdown()


def _replicas() -> list[int]:
    return [pid for pid, title in actor_titles() if title.startswith("ray::ServeReplica:rm")]


def test_scores_calls_and_latency(served):
    client = ServedReward("rm", FaultPolicy(call_timeout_s=60))
    assert client.check() == {"application": "rm", "status": "RUNNING"}
    rows = client.score(PROMPTS, RESPONSES, items_per_chunk=5)
    assert [r[0] for r in rows] == checker(PROMPTS, RESPONSES)
    stats = client.take_stats()
    assert stats["served/calls"] == 5 and stats["served/retries"] == 0  # 24 items in chunks of 5
    assert 0 < stats["served/latency_s_mean"] <= stats["served/latency_max_s"]
    assert client.take_stats()["served/calls"] == 0  # taken: counted afresh


def test_a_killed_replica_is_replaced_and_no_score_is_lost(served):
    client = ServedReward("rm", FaultPolicy(call_timeout_s=120, max_restarts=3))
    (pid,) = _replicas()
    os.kill(pid, signal.SIGKILL)
    rows = client.score(PROMPTS, RESPONSES, items_per_chunk=6)  # sent while Serve replaces the replica
    assert [r[0] for r in rows] == checker(PROMPTS, RESPONSES)
    deadline = time.monotonic() + 60
    while not (_replicas() and pid not in _replicas()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _replicas() and pid not in _replicas()
    assert client.take_stats()["served/calls"] == 4


def test_the_restart_budget_and_a_missing_application(served):
    with pytest.raises(ConfigError, match="'nope' is not deployed .*running: \\['rm'\\].*--reward-name nope"):
        ServedReward("nope", FaultPolicy()).check()
    client = ServedReward("rm", FaultPolicy(call_timeout_s=0.001, max_restarts=0))  # every call past its deadline
    with pytest.raises(FaultError, match="reward \\(served 'rm'\\): a call failed after 0 retries"):
        client.score(PROMPTS * 200, RESPONSES * 200, items_per_chunk=4800)
