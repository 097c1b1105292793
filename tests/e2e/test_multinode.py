"""Across nodes: `rlhf cluster up` starts a head that runs no work and two worker nodes (raylets of their
own, on 127.0.0.1, token auth on); `rlhf submit` runs SFT into on-policy DPO there with the trainers
pinned to node_a and the rollout, reward and reference roles to node_b, so weights cross raylets at
every sync."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from deploy import local_cluster
from tests.e2e.mlflow_reads import metric_history

ROOT = Path(__file__).resolve().parents[2]
ITERATIONS = 4


def _pipeline(tmp: Path) -> dict:
    roles = {"policy_trainer": "node_a", "rollout": "node_b", "reward": "node_b", "reference": "node_b"}
    return {
        "name": "multinode", "run_dir": str(tmp / "runs"),
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "log_checkpoints": False},
        "stages": [
            {"name": "task", "kind": "synthetic_task", "num_sft": 512, "num_prompts": 64, "num_eval": 16},
            {"name": "sft", "kind": "sft", "policy": {"from": "task"},
             "data": {"train": {"from": "task", "output": "sft_train"}},
             "optim": {"lr": 1.0e-3, "warmup_steps": 5}, "checkpoint": {"every": 0},
             "schedule": {"steps": 40, "sequences_per_step": 32, "sequences_per_microbatch": 32},
             "trainer": {"cpus_per_worker": 1}, "placement": {"nodes": {"policy_trainer": "node_a"}}},
            {"name": "dpo", "kind": "onpolicy_dpo", "policy": {"from": "sft"},
             # a reward the samples of a briefly trained model differ on: every iteration trains and syncs
             "reward": {"function": "pipelines.tasks.arithmetic:terse"},
             "data": {"train": {"from": "task", "output": "prompts_train"}, "max_prompt_length": 16},
             "sampling": {"samples_per_prompt": 4, "max_new_tokens": 8},
             "schedule": {"iterations": ITERATIONS, "prompts_per_iteration": 32, "pairs_per_update": 8,
                          "pairs_per_microbatch": 8},
             "dpo": {"beta": 0.1, "rpo_alpha": 1.0}, "optim": {"lr": 2.0e-4}, "eval": {"table_rows": 0},
             "trainer": {"cpus_per_worker": 0.5}, "reference_group": {"cpus_per_worker": 0.25},
             "reward_group": {"cpus_per_worker": 0.25},
             "rollout": {"cpus_per_worker": 1, "max_model_len": 64, "kv_cache_gib": 1},
             "placement": {"nodes": roles}},
        ],
    }


def _rlhf(args: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    up = _rlhf(["cluster", "up", "--dir", str(tmp / "cluster"), "--workers", "2", "--cpus-per-worker", "2"], env)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    record = local_cluster.LocalCluster.load(tmp / "cluster")
    yield record, env | {"RAY_AUTH_MODE": "token"}, tmp
    down = _rlhf(["cluster", "down", "--dir", str(tmp / "cluster")], env)
    assert down.returncode == 0, down.stderr[-2000:]
    assert "node_a" in down.stdout and "head" in down.stdout


def test_a_pipeline_across_three_nodes(cluster):
    record, env, tmp = cluster
    assert [(n.name, n.num_cpus) for n in record.nodes] == [("head", 0), ("node_a", 2), ("node_b", 2)]
    pipeline = tmp / "multinode.yaml"
    pipeline.write_text(yaml.safe_dump(_pipeline(tmp)))
    plan = _rlhf(["plan", str(pipeline)], env)
    assert "policy_trainer: 1 x {CPU: 0.5, GPU: 0} on node_a" in plan.stdout, plan.stdout
    assert "rollout: 1 x {CPU: 1, GPU: 0} on node_b" in plan.stdout
    assert "placement group rollout: {CPU: 1, GPU: 0} @node_b PACK" in plan.stdout

    proc = _rlhf(["submit", str(pipeline), "--address", record.dashboard, "--token-file", record.token_file,
                  "--follow"], env)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    parent_id = re.search(r"mlflow.run_id: ([0-9a-f]{32})", proc.stdout).group(1)

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_run(parent_id).info.experiment_id
    children = {r.info.run_name: r for r in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")}
    assert sorted(children) == ["dpo", "sft", "task"]
    dpo = children["dpo"]
    tags = dpo.data.tags
    trainer_node = tags["rlhf.placement.policy_trainer"]
    assert trainer_node == children["sft"].data.tags["rlhf.placement.policy_trainer"]
    assert tags["rlhf.placement.rollout"] == tags["rlhf.placement.reward"] == tags["rlhf.placement.reference"]
    assert tags["rlhf.placement.rollout"] != trainer_node  # the weights crossed raylets at every sync

    m = metric_history(client, dpo.info.run_id)
    assert len(m["sync/bytes"]) >= 1 and min(m["sync/bytes"]) > 0
    assert max(m["sync/logprob_max_abs_diff"]) <= 1e-3
    sft = metric_history(client, children["sft"].info.run_id)
    assert sft["loss"][-1] < 0.5 * sft["loss"][0]  # learning on node_a
    report = {"sync_bytes": m["sync/bytes"][-1], "sync_s": m["timing/sync_weights_s"],
              "parity": m["sync/logprob_max_abs_diff"], "scores": m["objective/scores"],
              "sft_loss": (sft["loss"][0], sft["loss"][-1])}
    print("multinode:", json.dumps(report))
