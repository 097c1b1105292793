"""`rlhf validate` exits 0 on a valid pipeline and 2 with a field path (no traceback) otherwise; `rlhf
run` exits 2 on bad input before Ray starts. One test runs the real entry point in a subprocess (the
process's exit code and stderr); the others call ``orchestrator.cli.main`` in-process (a subprocess
costs ~10 s of imports on 2 cores), with Ray's start replaced by a failure."""

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import cli, runner

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def rlhf(monkeypatch, capsys):
    """Runs ``rlhf ARGS`` in-process: returns (exit code, stdout, stderr). Fails the test if the
    command would start Ray; restores the SIGTERM handler ``rlhf run`` installs."""
    def no_ray(config):
        raise AssertionError(f"pipeline {config.name!r} would start Ray")

    monkeypatch.setattr(runner, "init_ray", no_ray)
    handler = signal.getsignal(signal.SIGTERM)

    def call(*args):
        try:
            code = cli.main(list(args))
        finally:
            signal.signal(signal.SIGTERM, handler)
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def test_validate_bad_value_exit_2_from_the_entry_point():
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", "pipelines/offline_dpo.yaml",
                           "--set", "stages.offline_dpo.dpo.beta=0"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "stages[1].dpo.beta: must be > 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_validate_ok(rlhf):
    code, out, err = rlhf("validate", str(ROOT / "pipelines/offline_dpo.yaml"))
    assert code == 0, err
    assert "valid pipeline 'offline_dpo'" in out and "policy_trainer" in out


@pytest.mark.parametrize("case", ["missing_model", "missing_data"])
def test_run_bad_inputs_exit_2_before_ray(rlhf, tmp_path, tiny_model_dir, monkeypatch, case):
    model = "/nonexistent/model" if case == "missing_model" else str(tiny_model_dir)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        f"name: t\nstages:\n  - name: dpo\n    kind: offline_dpo\n    policy: {model}\n"
        f"    data: {{train: {tmp_path}/missing.parquet}}\n"
    )
    monkeypatch.chdir(tmp_path)
    code, _, err = rlhf("run", str(pipeline))
    assert code == 2, err[-2000:]
    expected = ("model directory not found" if case == "missing_model"
                else "missing.parquet: preference pairs file not found")
    assert expected in err


def test_run_bad_checker_exit_2_before_ray(rlhf):
    code, _, err = rlhf("run", str(ROOT / "pipelines/sft.yaml"),
                        "--set", "stages.sft.generation.checker=no_such_module_q:check")
    assert code == 2, err[-2000:]
    assert "reward 'no_such_module_q:check': cannot import module 'no_such_module_q'" in err


@pytest.mark.parametrize("run_id,expected", [(None, "--resume: no earlier run of pipeline 'quickstart' under"),
                                             ("20260101-000000-abcdef", "no run '20260101-000000-abcdef'")])
def test_resume_without_that_run_exit_2_before_ray(rlhf, tmp_path, run_id, expected):
    args = ["run", str(ROOT / "pipelines/quickstart.yaml"), "--set", f"run_dir={tmp_path}", "--resume"]
    code, _, err = rlhf(*args, *([run_id] if run_id else []))
    assert code == 2, err[-2000:]
    assert expected in err


def test_plan_prints_the_stage_graph(rlhf):
    code, out, err = rlhf("plan", str(ROOT / "pipelines/quickstart.yaml"))
    assert code == 0, err
    assert "[5] ppo (ppo)\n      reads policy <- onpolicy_dpo.model, critic.model <- rm.reward_model" in out


def test_run_a_reported_stage_failure_exits_1_without_a_traceback(rlhf, monkeypatch):
    """The runner has printed the failed stage, its log and the log's tail; the CLI adds how to go
    on and exits 1 (a failed run, not bad input). With --verbose the traceback comes through."""
    def failing_run(config, **kwargs):
        error = RuntimeError("reward function raised")
        error.rlhf_reported = True
        raise error

    monkeypatch.setattr(runner, "run_pipeline", failing_run)
    code, out, err = rlhf("run", str(ROOT / "pipelines/offline_dpo.yaml"))
    assert code == 1
    assert "Traceback" not in err
    assert "continue it with: rlhf run" in err and "pipelines/offline_dpo.yaml --resume" in err
    with pytest.raises(RuntimeError, match="reward function raised"):
        rlhf("run", str(ROOT / "pipelines/offline_dpo.yaml"), "--verbose")


def test_ctrl_c_ends_with_the_resume_hint_and_no_traceback(rlhf, monkeypatch):
    def interrupted(config, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_pipeline", interrupted)
    code, _, err = rlhf("run", str(ROOT / "pipelines/offline_dpo.yaml"))
    assert code == 130
    pipeline = ROOT / "pipelines/offline_dpo.yaml"
    assert err.strip() == f"interrupted; continue it with: rlhf run {pipeline} --resume"


def test_run_with_corrupt_weights_exits_2_naming_the_file_before_ray(rlhf, tmp_path, tiny_model_dir):
    import shutil

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])  # a copy cut short
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"name: t\nstages:\n  - name: sft\n    kind: sft\n    policy: {model}\n"
                        f"    data: {{train: {tmp_path}/x.jsonl}}\n")
    (tmp_path / "x.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    code, _, err = rlhf("run", str(pipeline))
    assert code == 2, err[-2000:]
    assert f"{weights}: truncated: its header describes" in err
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"\x80")
    code, _, err = rlhf("validate", str(pipeline))
    assert code == 2 and "no safetensors weights (pytorch_model.bin are pickles, which are not loaded" in err


def test_a_chat_template_that_is_not_append_only_exits_2_before_ray(rlhf, tmp_path):
    """An environment stage on a model whose template drops earlier assistant turns' content (as
    templates that strip reasoning do): ``rlhf run`` and ``rlhf validate`` refuse it naming the
    template's model and the first token that differs; the same model with ChatML passes validate."""
    import json
    import shutil

    from pipelines.tasks.tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "model", size="tiny", seed=0, tokenizer="bpe")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"question": f"What is {a} * 3 + 1?", "answer": 3 * a + 1}) + "\n"
                             for a in range(2, 6)))
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        f"name: t\nstages:\n  - name: agent\n    kind: ppo\n    policy: {model}\n"
        "    environment: {cls: pipelines.tasks.calculator:CalculatorEnvironment, max_total_tokens: 120}\n"
        f"    data: {{train: {tasks}}}\n    algorithm: {{estimator: grpo}}\n"
        "    schedule: {prompts_per_iteration: 4, samples_per_microbatch: 16}\n    rollout: {max_model_len: 128}\n")
    code, _, err = rlhf("validate", str(pipeline))
    assert code == 0, err
    stripping = shutil.copytree(model, tmp_path / "stripping")
    config = json.loads((stripping / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\\n<|im_end|>\\n' }}{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    (stripping / "tokenizer_config.json").write_text(json.dumps(config))
    (stripping / "chat_template.jinja").unlink(missing_ok=True)
    pipeline.write_text(pipeline.read_text().replace(str(model), str(stripping)))
    for command in ("run", "validate"):
        code, _, err = rlhf(command, str(pipeline))
        assert code == 2, err[-2000:]
        assert f"agent: the policy {stripping}: the chat template is not append-only for tool messages" in err, err
        assert re.search(r"token \d+: '.*' became '.*'", err), err
