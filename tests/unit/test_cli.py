"""`rlhf validate` exits 0 on a valid pipeline and 2 with a field path (no traceback) otherwise."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _rlhf(*args):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, capture_output=True, text=True)


def test_validate_ok():
    proc = _rlhf("validate", "pipelines/offline_dpo.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "valid pipeline 'offline_dpo'" in proc.stdout and "policy_trainer" in proc.stdout


def test_validate_bad_value_exit_2():
    proc = _rlhf("validate", "pipelines/offline_dpo.yaml", "--set", "stages.offline_dpo.dpo.beta=0")
    assert proc.returncode == 2
    assert "stages[1].dpo.beta: must be > 0" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", ["missing_model", "missing_data"])
def test_run_bad_inputs_exit_2_before_ray(tmp_path, tiny_model_dir, case):
    model = "/nonexistent/model" if case == "missing_model" else str(tiny_model_dir)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        f"name: t\nstages:\n  - name: dpo\n    kind: offline_dpo\n    policy: {model}\n"
        f"    data: {{train: {tmp_path}/missing.parquet}}\n"
    )
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(pipeline)], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    expected = "model directory not found" if case == "missing_model" else "missing.parquet: preference pairs file not found"
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr and "Started a local Ray instance" not in proc.stderr


def test_run_bad_checker_exit_2_before_ray():
    proc = _rlhf("run", "pipelines/sft.yaml", "--set", "stages.sft.generation.checker=no_such_module_q:check")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "reward 'no_such_module_q:check': cannot import module 'no_such_module_q'" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("run_id,expected", [(None, "--resume: no earlier run of pipeline 'quickstart' under"),
                                             ("20260101-000000-abcdef", "no run '20260101-000000-abcdef'")])
def test_resume_without_that_run_exit_2_before_ray(tmp_path, run_id, expected):
    args = ["run", "pipelines/quickstart.yaml", "--set", f"run_dir={tmp_path}", "--resume"] + ([run_id] if run_id else [])
    proc = _rlhf(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr and "Started a local Ray instance" not in proc.stderr + proc.stdout


def test_plan_prints_the_stage_graph():
    proc = _rlhf("plan", "pipelines/quickstart.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "[5] ppo (ppo)\n      reads policy <- onpolicy_dpo.model, critic.model <- rm.reward_model" in proc.stdout
