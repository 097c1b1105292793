"""A real Ray cluster, as users run one: `rlhf cluster up` starts a head that runs no work and two
worker nodes (`ray start --block` each, raylets of their own, on 127.0.0.1, token auth on). On it:
a client without the token is refused clearly; `rlhf submit --follow` runs SFT into on-policy DPO as
a Ray job with the trainers pinned to node_a and the rollout, reward and reference roles to node_b,
so weights cross raylets at every sync, and `rlhf status` / `rlhf logs` find the job; a second job
is stopped with `rlhf stop` and its runs are closed as KILLED. (One cluster for all three: its
start-up and each job's are the cost.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from deploy import local_cluster
from tests.e2e.killers import kill_rollout_node_at_sync
from tests.e2e.mlflow_reads import metric_history

ROOT = Path(__file__).resolve().parents[2]
ITERATIONS = 2  # each iteration syncs across raylets; the lost-node tests (make test-all) run more


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


def test_without_the_token_the_cluster_refuses_clearly(cluster):
    record, env, _ = cluster
    proc = _rlhf(["status", "anything", "--address", record.dashboard], env)
    assert proc.returncode == 2
    assert "has Ray token auth on: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_pipeline_across_three_nodes(cluster):
    record, env, tmp = cluster
    assert [(n.name, n.num_cpus) for n in record.nodes] == [("head", 0), ("node_a", 2), ("node_b", 2)]
    pipeline = tmp / "multinode.yaml"
    pipeline.write_text(yaml.safe_dump(_pipeline(tmp)))
    plan = _rlhf(["plan", str(pipeline)], env)
    assert "policy_trainer: 1 x {CPU: 0.5, GPU: 0} on node_a" in plan.stdout, plan.stdout
    assert "rollout: 1 x {CPU: 1, GPU: 0} on node_b" in plan.stdout
    assert "placement group rollout: {CPU: 1, GPU: 0} @node_b PACK" in plan.stdout

    common = ["--address", record.dashboard, "--token-file", record.token_file]
    proc = _rlhf(["submit", str(pipeline), *common, "--follow"], env)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    sid = re.search(r"submitted job (rlhf-multinode-\S+) \(pipeline run (\S+)\)", proc.stdout)
    assert sid and sid.group(1) == f"rlhf-multinode-{sid.group(2)}"  # the submission id derives from the run id
    parent_id = re.search(r"mlflow.run_id: ([0-9a-f]{32})", proc.stdout).group(1)
    assert f"job {sid.group(1)}: SUCCEEDED" in proc.stdout
    assert f"MLflow parent run: {parent_id}" in proc.stdout  # the driver's summary, streamed back with the logs

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == sid.group(2)
    assert parent.data.tags["rlhf.submission_id"] == sid.group(1)
    experiment = parent.info.experiment_id
    children = {r.info.run_name: r
                for r in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")}
    assert sorted(children) == ["dpo", "sft", "task"]
    assert all(r.info.status == "FINISHED" for r in children.values())
    status = _rlhf(["status", sid.group(1), *common], env)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and f"mlflow.run_id: {parent_id}" in status.stdout
    assert f"pipeline run {sid.group(2)}" in _rlhf(["logs", sid.group(1), *common], env).stdout
    dpo = children["dpo"]
    tags = dpo.data.tags
    trainer_node = tags["rlhf.placement.policy_trainer"]
    assert trainer_node == children["sft"].data.tags["rlhf.placement.policy_trainer"]
    assert tags["rlhf.placement.rollout"] == tags["rlhf.placement.reference"]
    assert "rlhf.placement.reward" not in tags  # the function reward runs in the rollout workers
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


def test_stop_closes_the_runs_as_killed(cluster):
    """`pipelines/sft.yaml` (2000 SFT steps) submitted without --follow, stopped once its SFT stage
    runs: the job ends STOPPED, the SFT child run and the parent KILLED, the finished task stage kept."""
    record, env, tmp = cluster
    uri = f"sqlite:///{tmp}/mlflow_stop.db"
    common = ["--address", record.dashboard, "--token-file", record.token_file]
    proc = _rlhf(["submit", "pipelines/sft.yaml", *common, "--set", f"run_dir={tmp}/runs",
                  "--set", f"tracking.uri={uri}",
                  "--set", "stages.task.num_sft=256", "--set", "stages.task.num_eval=16",
                  "--set", "stages.sft.trainer.cpus_per_worker=1", "--set", "stages.sft.optim.warmup_steps=2"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sid = re.search(r"submitted job (\S+)", proc.stdout).group(1)
    parent_id = re.search(r"mlflow.run_id: ([0-9a-f]{32})", proc.stdout).group(1)
    client = MlflowClient(uri)
    deadline = time.monotonic() + 240
    while not client.search_runs([client.get_run(parent_id).info.experiment_id],
                                 f"tags.mlflow.parentRunId = '{parent_id}' and attributes.run_name = 'sft'"):
        assert time.monotonic() < deadline, _rlhf(["logs", sid, *common], env).stdout[-3000:]
        time.sleep(2)  # wait until the SFT stage is running
    assert _rlhf(["stop", sid, *common], env).returncode == 0
    deadline = time.monotonic() + 120
    while "STOPPED" not in (status := _rlhf(["status", sid, *common], env)).stdout:
        assert time.monotonic() < deadline, status.stdout
        time.sleep(2)
    runs = {r.info.run_name: r.info.status for r in client.search_runs(
        [client.get_run(parent_id).info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")}
    assert runs == {"task": "FINISHED", "sft": "KILLED"}
    assert client.get_run(parent_id).info.status == "KILLED"


@pytest.mark.slow
def test_a_lost_worker_node_is_survived(tmp_path):
    """node_a (1 CPU) holds the trainer; the rollout worker lands on node_b or node_c. After the first
    weight sync of the on-policy stage that node's `ray start` process group is killed: raylet, object
    store and workers. Its bundles are placed again on the other spare node, the lost ranks replaced
    and caught up, and the job finishes with every iteration logged once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    cluster = local_cluster.up(tmp_path / "cluster", worker_cpus=(1, 2, 2))
    try:
        node_a = next(n for n in cluster.nodes if n.name == "node_a")
        config = _pipeline(tmp_path)
        config["stages"][2]["placement"] = {"nodes": {"policy_trainer": "node_a"}}
        config["stages"][2]["schedule"]["iterations"] = 6
        pipeline = tmp_path / "lost_node.yaml"
        pipeline.write_text(yaml.safe_dump(config))
        submit = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "submit", str(pipeline), "--address", cluster.dashboard,
             "--token-file", cluster.token_file, "--follow"], cwd=ROOT, env=env | {"RAY_AUTH_MODE": "token"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        killed = kill_rollout_node_at_sync(cluster, lambda: submit.poll() is None)
        assert killed != node_a.name, "the rollout worker shares the trainer's node"
        out, _ = submit.communicate(timeout=900)
        (tmp_path / "submit.log").write_text(out)
        assert killed is not None, out[-4000:]
        assert submit.returncode == 0, out[-6000:]
        assert re.search(r"fault: rollout rank 0 on node \w+ died", out), out[-4000:]
        parent_id = re.search(r"mlflow.run_id: ([0-9a-f]{32})", out).group(1)
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        experiment = client.get_run(parent_id).info.experiment_id
        (dpo,) = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}' and "
                                                  "attributes.run_name = 'dpo'")
        steps = [m.step for m in client.get_metric_history(dpo.info.run_id, "objective/scores")]
        assert steps == list(range(1, 7))
        m = metric_history(client, dpo.info.run_id)
        assert m["faults/restarts/rollout"] == [1.0] and max(m["sync/logprob_max_abs_diff"]) <= 1e-3
        print("lost node:", killed, "recovery_s", m["faults/recovery_s"])
    finally:
        local_cluster.down(tmp_path / "cluster")


@pytest.mark.slow
def test_a_lost_node_the_cluster_cannot_replace_stops_the_run_and_resume_continues_it(tmp_path):
    """node_b holds the rollout, reward and reference roles (pinned) and is lost at a weight sync after
    the on-policy stage's first checkpoint. Nothing else has node_b's resource: the job fails within the placement
    timeout with an error naming the stage, the bundle it waits for and what the cluster has left;
    the stage's checkpoint is kept. `rlhf cluster restart node_b` and `rlhf submit --resume` then
    finish the run in the same MLflow child run, every iteration logged once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    cluster = local_cluster.up(tmp_path / "cluster", worker_cpus=(1, 2))
    try:
        config = _pipeline(tmp_path)
        config["ray"] = {"placement_timeout_s": 20}
        dpo = config["stages"][2]
        dpo["checkpoint"] = {"every": 1}
        dpo["schedule"]["iterations"] = 4
        pipeline = tmp_path / "no_fit.yaml"
        pipeline.write_text(yaml.safe_dump(config))
        submit = [sys.executable, "-m", "orchestrator.cli", "submit", str(pipeline), "--address", cluster.dashboard,
                  "--token-file", cluster.token_file, "--follow"]
        job_env = env | {"RAY_AUTH_MODE": "token"}
        first = subprocess.Popen(submit, cwd=ROOT, env=job_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        checkpoint = tmp_path / "runs" / "multinode"
        killed = kill_rollout_node_at_sync(cluster, lambda: first.poll() is None,
                                           lambda: any(checkpoint.glob("*/stages/dpo/checkpoint/state.json")))
        out, _ = first.communicate(timeout=900)
        (tmp_path / "first.log").write_text(out)
        assert killed == "node_b", out[-4000:]
        assert first.returncode != 0, out[-4000:]
        error = re.search(r"stage 'dpo': (rollout|reward|reference) rank 0 died.*", out)
        assert error, out[-6000:]
        assert "cannot be placed again within 20s" in error.group(0) and "node_b" in error.group(0)
        assert "live node(s)" in error.group(0) and "--resume" in error.group(0)
        run_id = re.search(r"pipeline run ([\w-]+)\)", out).group(1)
        assert list((tmp_path / "runs").glob(f"multinode/{run_id}/stages/dpo/checkpoint/state.json"))

        local_cluster.restart_node(tmp_path / "cluster", "node_b")
        resumed = subprocess.run([*submit, "--resume", run_id], cwd=ROOT, env=job_env, capture_output=True, text=True,
                                 timeout=900)
        assert resumed.returncode == 0, resumed.stdout[-6000:] + resumed.stderr[-2000:]
        parent_id = re.search(r"mlflow.run_id: ([0-9a-f]{32})", out).group(1)
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        experiment = client.get_run(parent_id).info.experiment_id
        children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")
        assert sorted(r.info.run_name for r in children) == ["dpo", "sft", "task"]
        (dpo_run,) = [r for r in children if r.info.run_name == "dpo"]
        steps = [m.step for m in client.get_metric_history(dpo_run.info.run_id, "objective/scores")]
        assert steps == list(range(1, 5))
        assert max(metric_history(client, dpo_run.info.run_id)["sync/logprob_max_abs_diff"]) <= 1e-3
        print("no fit:", error.group(0)[:400])
    finally:
        local_cluster.down(tmp_path / "cluster")
