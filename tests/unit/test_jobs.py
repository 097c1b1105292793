"""`rlhf submit` without a cluster: ids, the config the cluster sees, what is uploaded, what is sent."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import jobs
from orchestrator.config import load_pipeline
from orchestrator.run_state import stage_hashes
from pipelines.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def test_submission_id_is_derived_from_the_run_id():
    assert jobs.submission_id_for("ppo", "20261124-101010-abc123") == "rlhf-ppo-20261124-101010-abc123"
    assert jobs.submission_id_for("ppo", "r1") == jobs.submission_id_for("ppo", "r1")
    assert jobs.submission_id_for("ppo", "r1", resume_attempt=2) == "rlhf-ppo-r1-resume2"


@pytest.mark.parametrize("address,local", [(None, True), ("http://127.0.0.1:8265", True), ("localhost:8265", True),
                                           ("http://ray-head.svc:8265", False), ("http://10.0.0.7:8265", False)])
def test_local_address(address, local):
    assert jobs.is_local_address(address) is local


def test_local_cluster_gets_absolute_run_dir_and_store(tmp_path):
    config = load_pipeline(ROOT / "pipelines/sft.yaml")
    seen, uri = jobs.cluster_view(config, "sqlite:///mlflow.db", local=True, cwd=tmp_path)
    assert seen.run_dir == str(tmp_path / "runs")
    assert uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert seen.stages == config.stages


@pytest.mark.parametrize("uri,run_dir,expected", [
    ("sqlite:///mlflow.db", "/mnt/runs", "is a file on this machine"),
    ("file:///tmp/mlruns", "/mnt/runs", "is a file on this machine"),
    ("http://mlflow:5000", "runs", "run_dir 'runs' is relative"),
    ("http://user:secret@mlflow:5000", "/mnt/runs", "credentials in the URI"),
])
def test_remote_cluster_refuses_what_it_cannot_reach(uri, run_dir, expected):
    config = load_pipeline(ROOT / "pipelines/sft.yaml", [f"run_dir={run_dir}"])
    with pytest.raises(UserError, match=expected) as info:
        jobs.cluster_view(config, uri, local=False, cwd=Path("/tmp"))
    assert "secret" not in str(info.value)


def test_remote_cluster_with_server_and_shared_storage_passes():
    config = load_pipeline(ROOT / "pipelines/sft.yaml", ["run_dir=/mnt/runs"])
    seen, uri = jobs.cluster_view(config, "http://mlflow:5000", local=False, cwd=Path("/tmp"))
    assert (seen, uri) == (config, "http://mlflow:5000")


@pytest.mark.parametrize("pipeline", sorted((ROOT / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_pipeline_reloads_with_equal_stage_hashes(pipeline, tmp_path):
    """The job runs the resolved YAML; a resume on the cluster must see the same stage hashes."""
    config = load_pipeline(pipeline)
    (tmp_path / "p.yaml").write_text(jobs.pipeline_yaml(config, "http://mlflow:5000"))
    again = load_pipeline(tmp_path / "p.yaml")
    assert stage_hashes(again) == stage_hashes(config)
    assert again.tracking.uri == "http://mlflow:5000"


def test_staged_working_dir_leaves_out_environments_and_run_outputs(tmp_path):
    src = tmp_path / "project"
    for rel in ("rewards/my_reward.py", ".venv/bin/python", ".git/HEAD", "runs/p/1/state.json", "mlflow.db",
                "pkg/__pycache__/m.cpython-311.pyc", "data/train.parquet"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x")
    staged = jobs.stage_working_dir(src, tmp_path / "pkg", "name: p\n", extra_excludes=("runs",))
    files = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    assert files == [".rlhf_job/pipeline.yaml", "data/train.parquet", "rewards/my_reward.py"]


def test_oversized_working_dir_is_refused_naming_the_biggest_entry(tmp_path, monkeypatch):
    src = tmp_path / "project"
    (src / "data").mkdir(parents=True)
    (src / "data" / "big.bin").write_bytes(b"0" * 4096)
    monkeypatch.setattr(jobs, "MAX_UPLOAD_BYTES", 1024)
    with pytest.raises(UserError, match=r"largest: data"):
        jobs.stage_working_dir(src, tmp_path / "pkg", "name: p\n")


def test_job_spec_adopts_the_mlflow_run_and_carries_its_ids():
    config = load_pipeline(ROOT / "pipelines/sft.yaml")
    spec = jobs.job_spec(config, "r1", "http://mlflow:5000", mlflow_ids=("3", "abc"), submission_id="rlhf-sft-r1",
                         resume=False, working_dir="/tmp/pkg")
    assert spec.entrypoint == ("python -m orchestrator.cli run .rlhf_job/pipeline.yaml --run-id r1 "
                               "--mlflow-run-id abc")
    assert spec.metadata == {"rlhf.pipeline": "sft", "rlhf.run_id": "r1", "mlflow.tracking_uri": "http://mlflow:5000",
                             "mlflow.experiment_id": "3", "mlflow.run_id": "abc"}
    assert spec.runtime_env["working_dir"] == "/tmp/pkg"
    assert spec.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    resumed = jobs.job_spec(config, "r1", "http://mlflow:5000", mlflow_ids=("3", "abc"),
                            submission_id="rlhf-sft-r1-resume1", resume=True, working_dir="/tmp/pkg")
    assert resumed.entrypoint == "python -m orchestrator.cli run .rlhf_job/pipeline.yaml --resume r1"


def _rlhf(*args, cwd=ROOT):
    # mlflow.set_tracking_uri in earlier tests of this process exports MLFLOW_TRACKING_URI; drop it.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


def test_submit_to_a_remote_cluster_with_a_local_store_exits_2_before_contacting_it():
    proc = _rlhf("submit", "pipelines/sft.yaml", "--address", "http://203.0.113.9:8265", "--set", "run_dir=/mnt/runs",
                 "--set", "tracking.uri=sqlite:///mlflow.db")
    assert proc.returncode == 2, proc.stderr
    assert "tracking URI sqlite:///mlflow.db is a file on this machine" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,expected", [
    (["run", "pipelines/sft.yaml", "--run-id", "../escape"], "a run id is letters"),
    (["run", "pipelines/sft.yaml", "--run-id", "r1", "--resume", "r0"], "--resume and --run-id exclude each other"),
])
def test_run_id_is_checked(args, expected):
    proc = _rlhf(*args)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr


def test_submit_retries_a_head_whose_job_agent_is_not_up_yet_within_a_deadline(monkeypatch):
    """Ray's answer to a job submitted seconds after `ray start --head` (HTTP 500) is tried again;
    any other refusal, or the same one past the deadline, is a UserError at once."""
    from deploy import jobs
    from pipelines.errors import UserError

    monkeypatch.setattr(jobs.time, "sleep", lambda s: None)
    refusal = RuntimeError("Request failed with status code 500: No available agent to submit job, please try "
                           "again later.")
    answers = [refusal, refusal, "raysubmit_x"]

    def submit_job(**kwargs):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert jobs.call_retrying("submitting the job", submit_job, entrypoint="x") == "raysubmit_x" and not answers

    def refused(**kwargs):
        raise RuntimeError("Request failed with status code 400: Job with submission_id x already exists.")

    with pytest.raises(UserError, match="submitting the job: .*already exists"):
        jobs.call_retrying("submitting the job", refused)

    def never(**kwargs):
        raise refusal

    with pytest.raises(UserError, match=r"the cluster still refused after 0 s: .*No available agent"):
        jobs.call_retrying("submitting the job", never, deadline_s=0.0)
