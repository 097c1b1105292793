"""A pipeline run killed with SIGKILL in the middle of a multi-step stage, then ``rlhf run --resume``:
completed stages are not run again, the interrupted stage continues from its last in-stage checkpoint
to its planned number of steps, and MLflow holds one parent run with exactly one child per stage
whose metric steps are contiguous (no step missing, none logged twice). Real Ray, DeepSpeed and
MLflow, through the CLI as a user runs it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
DPO_STEPS, EVERY = 60, 20


def _pipeline(tmp_path: Path) -> Path:
    config = {
        "name": "resume_e2e", "seed": 0, "run_dir": str(tmp_path / "runs"),
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "system_metrics": False, "log_checkpoints": False},
        "ray": {"num_cpus": 2},
        "stages": [
            {"name": "task", "kind": "synthetic_task", "max_operand": 19, "num_sft": 512, "num_pairs": 512,
             "num_prompts": 8, "num_eval": 32},
            {"name": "sft", "kind": "sft", "policy": {"from": "task"},
             "data": {"train": {"from": "task", "output": "sft_train"}, "eval": {"from": "task", "output": "sft_eval"}},
             "generation": {"max_new_tokens": 4},
             "schedule": {"steps": 30, "sequences_per_step": 16, "sequences_per_microbatch": 16},
             "trainer": {"cpus_per_worker": 2}},
            {"name": "dpo", "kind": "offline_dpo", "policy": {"from": "sft"},
             "data": {"train": {"from": "task", "output": "pairs_train"},
                      "eval": {"from": "task", "output": "pairs_eval"}},
             "schedule": {"steps": DPO_STEPS, "pairs_per_step": 16, "pairs_per_microbatch": 16, "eval_every": EVERY},
             "checkpoint": {"every": EVERY}, "trainer": {"cpus_per_worker": 2}},
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _rlhf(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return env | {"PYTHONPATH": str(ROOT)}


def _kill_after_first_checkpoint(pipeline: Path, runs: Path) -> Path:
    """Start the run in its own process group; SIGKILL the whole group as soon as the dpo stage has
    written an in-stage checkpoint (so it dies mid-stage, checkpoint behind it, steps ahead of it)."""
    proc = subprocess.Popen(_rlhf("run", str(pipeline), "--quiet"), cwd=ROOT, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 420
    try:
        while time.monotonic() < deadline:
            found = list(runs.glob("resume_e2e/*/stages/dpo/checkpoint/state.json"))
            if found:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return found[0].parents[3]
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-3000:]}"
            time.sleep(0.05)
        raise AssertionError("no in-stage checkpoint within 7 minutes")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _children(client: MlflowClient, parent_id: str) -> dict[str, object]:
    runs = client.search_runs([client.get_run(parent_id).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_id}'")
    names = [r.info.run_name for r in runs]
    assert len(names) == len(set(names)), f"a stage has more than one child run: {sorted(names)}"
    return {r.info.run_name: r for r in runs}


def test_sigkill_mid_stage_then_resume(tmp_path):
    pipeline = _pipeline(tmp_path)
    run_dir = _kill_after_first_checkpoint(pipeline, tmp_path / "runs")

    state = json.loads((run_dir / "state.json").read_text())
    assert state["stages"]["sft"]["status"] == "completed" and state["stages"]["dpo"]["status"] == "running"
    killed_at = json.loads((run_dir / "stages/dpo/checkpoint/state.json").read_text())["step"]
    assert killed_at % EVERY == 0 and 0 < killed_at < DPO_STEPS
    sft_model = Path(state["stages"]["sft"]["outputs"]["model"])
    sft_written = sft_model.stat().st_mtime_ns

    done = subprocess.run(_rlhf("run", str(pipeline), "--resume"), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "task: completed earlier with this config; outputs reused" in done.stdout
    assert "sft: completed earlier with this config; outputs reused" in done.stdout
    assert sft_model.stat().st_mtime_ns == sft_written  # not trained again
    # A quiet console: the plan, progress lines and the summary; what the actors printed (DeepSpeed,
    # transformers, Ray's "(PolicyTrainer pid=...)" lines) is in the stage's log, across both attempts.
    console = done.stdout + done.stderr
    assert "pid=" not in console and "Loading weights" not in console, console[-3000:]
    dpo_log = (run_dir / "stages/dpo/stage.log").read_text()
    assert dpo_log.count("(PolicyTrainer pid=") >= 2, dpo_log[-3000:]
    assert len({line.split("pid=")[1].split(")")[0]
                for line in dpo_log.splitlines() if "(PolicyTrainer pid=" in line}) == 2

    after = json.loads((run_dir / "state.json").read_text())
    assert after["attempts"] == 2 and {s["status"] for s in after["stages"].values()} == {"completed"}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parents = client.search_runs([client.get_run(state["mlflow_parent_run_id"]).info.experiment_id],
                                 "tags.`rlhf.pipeline` = 'resume_e2e'")
    assert [p.info.run_id for p in parents] == [state["mlflow_parent_run_id"]]  # reopened, not duplicated
    assert parents[0].info.status == "FINISHED"
    children = _children(client, state["mlflow_parent_run_id"])
    assert sorted(children) == ["dpo", "sft", "task"]
    assert all(c.info.status == "FINISHED" for c in children.values())
    for name, stage in after["stages"].items():
        assert children[name].info.run_id == stage["mlflow_run_id"] == state["stages"][name]["mlflow_run_id"]

    dpo = children["dpo"].info.run_id
    loss_steps = [m.step for m in client.get_metric_history(dpo, "loss")]
    assert sorted(loss_steps) == list(range(1, DPO_STEPS + 1))  # every planned step, each once
    assert sorted(m.step for m in client.get_metric_history(dpo, "eval/loss")) == [0, 20, 40, 60]
    sft_steps = [m.step for m in client.get_metric_history(children["sft"].info.run_id, "loss")]
    assert sorted(sft_steps) == list(range(1, 31))
    assert Path(after["stages"]["dpo"]["outputs"]["model"], "model.safetensors").is_file()
    assert [a.path for a in client.list_artifacts(dpo, "logs")] == ["logs/stage.log"]
