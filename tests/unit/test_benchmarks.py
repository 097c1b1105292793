"""Benchmark gates without Ray: the shipped lm-eval tasks (their data held out, their YAML read and
checked when a pipeline loads), lm-eval itself on a tiny checkpoint, result names, the requirements
of ``registry.promote`` and the alias moved or refused in a real MLflow registry (SQLite)."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import load_pipeline
from orchestrator.lineage import RunRegistry, register_model
from pipelines.benchmarks import make_data
from pipelines.benchmarks.tasks import load_task, shipped_tasks
from pipelines.errors import ConfigError
from pipelines.stages.benchmarks import (
    BenchmarksConfig,
    PromoteConfig,
    failed_requirements,
    flatten_results,
    promote,
    run_benchmarks,
)
from pipelines.tasks.arithmetic import split_problems
from tests.unit.test_lineage import _run_with_checkpoint

ROOT = Path(__file__).resolve().parents[2]
DISTILL = ROOT / "pipelines" / "distill.yaml"


def test_the_shipped_tasks_hold_held_out_problems_and_reproduce():
    assert shipped_tasks() == ["arith_choice", "arith_heldout"]
    train, held_out = split_problems(make_data.MAX_OPERAND, make_data.EVAL_FRACTION, make_data.SEED)
    seen = {p.prompt for p in train}
    gen, choice = make_data.rows()
    for name, rows in (("arith_heldout", gen), ("arith_choice", choice)):
        task = load_task(name)
        lines = Path(task["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows  # the files are what make_data writes
        assert not {r["question"] for r in rows} & seen  # no training problem of the task's split
    assert all(r["choices"][r["label"]] == str(eval(r["question"][:-1])) for r in choice)
    assert len({r["label"] for r in choice}) == 4  # the right answer is not always in one place


def test_task_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not a shipped lm-eval task"):
        load_task("arith_nope")
    bad = tmp_path / "t.yaml"
    bad.write_text("task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: missing.jsonl}}\n")
    with pytest.raises(ConfigError, match=r"t.yaml: dataset_kwargs.data_files.test: .*missing.jsonl not found"):
        load_task(str(bad))
    bad.write_text("task: t\ndoc_to_text: !function utils.doc\n")
    with pytest.raises(ConfigError, match="!function tags are not read"):
        load_task(str(bad))
    with pytest.raises(ConfigError, match=r"benchmarks.tasks: \[0\] .*arith_nope"):
        load_pipeline(DISTILL, ["stages.evaluate.benchmarks.tasks=[arith_nope]"])
    with pytest.raises(ConfigError, match="needs the task 'arith_choice' in benchmarks.tasks"):
        load_pipeline(DISTILL, ["stages.evaluate.benchmarks.tasks=[arith_heldout]"])


def test_lm_eval_runs_the_shipped_tasks_on_a_checkpoint(tiny_model_dir):
    """The real harness, in process: an untrained model answers about at chance."""
    numbers = run_benchmarks(BenchmarksConfig(tasks=("arith_heldout", "arith_choice"), limit=20), str(tiny_model_dir))
    assert set(numbers) >= {"lm_eval/arith_heldout/exact_match", "lm_eval/arith_choice/acc",
                            "lm_eval/arith_choice/acc_norm", "lm_eval/arith_choice/acc_stderr"}
    assert numbers["lm_eval/arith_heldout/exact_match"] == 0.0
    assert 0.0 <= numbers["lm_eval/arith_choice/acc"] <= 0.6


def test_result_names_and_requirements():
    flat = flatten_results({"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict": 1,
                                  "sample_len": 10}})
    assert flat == {"lm_eval/t/acc": 0.5, "lm_eval/t/acc_stderr": 0.1, "lm_eval/t/exact_match_strict": 1.0}
    row = {"exact_match": 0.8, "kl": 0.7, "lm_eval/t/acc": 0.5}
    assert failed_requirements({"exact_match": 0.8, "-kl": 0.7}, row) == []
    assert failed_requirements({"exact_match": 0.9, "-kl": 0.5, "lm_eval/t/acc": 0.4, "x": 1.0}, row) == [
        "exact_match 0.8 < 0.9", "kl 0.7 > 0.5", "x missing"]


def test_promote_moves_the_alias_only_where_every_requirement_holds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("promote")
    runs = {}
    for stage in ("sft", "ppo"):
        runs[stage] = _run_with_checkpoint(tmp_path, stage.encode())
        register_model(uri, run_id=runs[stage], name=f"p-{stage}", artifact_path="checkpoints/model", tags={},
                       numbers={}, alias="best", best_by=("eval/exact_match",))
    rows = {"sft": {"exact_match": 0.7, "lm_eval/t/acc": 0.9}, "ppo": {"exact_match": 0.95, "lm_eval/t/acc": 0.9}}
    cfg = PromoteConfig(alias="production", require={"exact_match": 0.9, "lm_eval/t/acc": 0.8})
    lines = promote(cfg, {"sft": "sft", "ppo": "ppo"}, rows, RunRegistry(uri, runs), "evaluate")
    assert lines == ["evaluate: @production refused for sft (exact_match 0.7 < 0.9)",
                     "evaluate: @production -> p-ppo v1 (ppo: exact_match 0.95, lm_eval/t/acc 0.9; every requirement "
                     "met)"]
    client = MlflowClient(uri)
    assert str(client.get_model_version_by_alias("p-ppo", "production").version) == "1"
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias("p-sft", "production")
    assert client.get_model_version("p-sft", "1").tags["rlhf.promote.production"] == "refused: exact_match 0.7 < 0.9"
    assert client.get_model_version("p-ppo", "1").tags["rlhf.promote.production"].startswith("moved: ")
