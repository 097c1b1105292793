"""Lineage in a real MLflow store (SQLite): model versions with their tags, the alias on the best
version by the first ranking metric a stage has, models:/ URIs resolved to a checkpoint; datasets as
run inputs with source and digest; which of a stage's inputs are data, and in which context."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import load_pipeline
from orchestrator.lineage import (
    DatasetInput,
    RunRegistry,
    best_metric,
    better,
    file_digest,
    log_datasets,
    register_model,
    registered_name,
    resolve_model_uri,
    stage_datasets,
    stage_numbers,
)
from pipelines.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[2]
BEST_BY = ("eval/exact_match", "-eval/loss")


def _run_with_checkpoint(tmp_path, weights: bytes) -> str:
    ckpt = tmp_path / f"ckpt_{weights.hex()}"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(weights)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(ckpt), "checkpoints/model")
    return run.info.run_id


def test_versions_are_tagged_and_the_alias_follows_the_best(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("lineage")
    common = {"name": "quickstart-ppo", "artifact_path": "checkpoints/model", "alias": "best", "best_by": BEST_BY}
    first = register_model(uri, run_id=_run_with_checkpoint(tmp_path, b"v1"), tags={"rlhf.stage": "ppo"},
                           numbers={"eval/exact_match": 0.80, "eval/loss": 1.0}, **common)
    worse = register_model(uri, run_id=_run_with_checkpoint(tmp_path, b"v2"), tags={"rlhf.stage": "ppo"},
                           numbers={"eval/exact_match": 0.75}, **common)
    best = register_model(uri, run_id=_run_with_checkpoint(tmp_path, b"v3"), tags={"rlhf.stage": "ppo"},
                          numbers={"eval/exact_match": 0.85}, **common)
    # a rerun with the same result (a float32 accuracy logged at full precision, tagged at 6 digits) ties
    same = register_model(uri, run_id=_run_with_checkpoint(tmp_path, b"v4"), tags={"rlhf.stage": "ppo"},
                          numbers={"eval/exact_match": 0.8500000238418579}, **common)
    assert [(r.version, r.alias_moved) for r in (first, worse, best, same)] == [
        ("1", True), ("2", False), ("3", True), ("4", False)]
    client = MlflowClient(uri)
    holder = client.get_model_version_by_alias("quickstart-ppo", "best")
    assert (str(holder.version) == "3" and holder.tags["eval/exact_match"] == "0.85"
            and holder.tags["rlhf.stage"] == "ppo")
    assert client.get_model_version("quickstart-ppo", "1").tags["eval/loss"] == "1"

    # The quickstart's evaluate stage compared the policy of stage "ppo" (this run: version 3's run);
    # its after-run hook tags what that stage registered in this run, through the driver's registry.
    evaluate = load_pipeline(ROOT / "pipelines/quickstart.yaml").stage("evaluate")
    comparison = tmp_path / "comparison.json"
    comparison.write_text(json.dumps({"policies": [{"policy": p.name, "win_rate": 0.625, "kl": 1.5, "name": "x"}
                                                   for p in evaluate.policies]}))
    registry = RunRegistry(uri, {"ppo": holder.run_id})
    evaluate.after_run({"comparison": str(comparison)}, registry)
    assert registry.tag_versions("sft", {"x": "1"}) == 0  # no stage of this run by that name registered
    assert client.get_model_version("quickstart-ppo", "3").tags["evaluate/win_rate"] == "0.625"
    assert client.get_model_version("quickstart-ppo", "3").tags["evaluate/kl"] == "1.5"
    assert "evaluate/win_rate" not in client.get_model_version("quickstart-ppo", "2").tags
    evaluate.after_run({"comparison": str(comparison)}, None)  # a run that registers nothing: nothing to tag

    served = Path(resolve_model_uri("models:/quickstart-ppo@best", uri))
    assert (served / "model.safetensors").read_bytes() == b"v3" and served.name == "quickstart-ppo@best"
    assert (Path(resolve_model_uri("models:/quickstart-ppo/1", uri)) / "model.safetensors").read_bytes() == b"v1"
    assert resolve_model_uri("/plain/path", uri) == "/plain/path"
    with pytest.raises(UserError, match="models:/nope@best: not found in the model registry"):
        resolve_model_uri("models:/nope@best", uri)


def test_a_stage_is_judged_by_its_final_held_out_numbers_or_its_training_loss():
    history = {"loss": [(1, 0.9), (2, 0.5)], "eval/exact_match": [(0, 0.1), (2, 0.6)], "eval/bad": [(2, float("nan"))],
               "lr": [(1, 1e-3)]}
    assert stage_numbers(history) == {"eval/exact_match": 0.6, "loss": 0.5}
    assert stage_numbers(history | {"eval/loss": [(2, 0.7)]}) == {"eval/exact_match": 0.6, "eval/loss": 0.7}


def test_ranking_rules():
    assert best_metric(BEST_BY, {"eval/loss": 0.5}) == ("eval/loss", 0.5, True)
    assert best_metric(BEST_BY, {"eval/exact_match": 0.5, "eval/loss": 0.1}) == ("eval/exact_match", 0.5, False)
    assert best_metric(BEST_BY, {"loss": 0.1}) is None
    assert better(0.9, 0.8, False) and not better(0.8, 0.9, False) and better(0.8, 0.9, True)
    assert better(0.1, None, False) and not better(None, 0.1, False) and not better(0.8, 0.8, False)
    assert registered_name("{pipeline}-{stage}", "quickstart", "ppo", "model") == "quickstart-ppo"


def test_a_bad_registry_name_or_registry_without_checkpoints_is_a_config_error():
    with pytest.raises(ConfigError, match=r"tracking.registry.name: '\{run\}-x' may use"):
        load_pipeline(ROOT / "pipelines/quickstart.yaml", ["tracking.registry.name={run}-x"])
    with pytest.raises(ConfigError, match="registry.enabled: a model version points at the run's logged checkpoint"):
        load_pipeline(ROOT / "pipelines/quickstart.yaml", ["tracking.log_checkpoints=false",
                                                           "tracking.registry.enabled=true"])
    config = load_pipeline(ROOT / "pipelines/quickstart.yaml", ["tracking.log_checkpoints=false"])
    assert config.tracking.registers is False


def test_data_inputs_and_their_contexts():
    config = load_pipeline(ROOT / "pipelines/quickstart.yaml")
    found = {s.name: stage_datasets(s, lambda field: f"<{field}>") for s in config.stages}
    assert found["sft"] == [DatasetInput("data.train", "<data.train>", "train"),
                            DatasetInput("data.eval", "<data.eval>", "eval")]
    assert found["task"] == [] and found["rm"][0].context == "train"
    assert found["evaluate"] == [DatasetInput("data.prompts", "<data.prompts>", "eval")]


def test_datasets_are_logged_with_source_and_digest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("datasets")
    data = tmp_path / "pairs_train.parquet"
    data.write_bytes(b"rows")
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "data.arrow").write_bytes(b"rows")
    assert file_digest(data) != file_digest(folder) and len(file_digest(data)) == 16
    with mlflow.start_run() as parent, mlflow.start_run(nested=True) as run:
        log_datasets([DatasetInput("data.train", str(data), "train"), DatasetInput("data.eval", str(folder), "eval")],
                     stage="sft", parent_run_id=parent.info.run_id)
    inputs = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    assert by_name["pairs_train"].dataset.digest == file_digest(data)
    assert str(data) in by_name["pairs_train"].dataset.source
    contexts = {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in inputs}
    assert contexts == {"pairs_train": "train", "saved": "eval"}
    # The pipeline's parent run holds them too, by stage, for the runs table's top rows.
    on_parent = MlflowClient().get_run(parent.info.run_id).inputs.dataset_inputs
    assert {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in on_parent} == {
        "pairs_train": "sft/train", "saved": "sft/eval"}
    assert {i.dataset.digest for i in on_parent} == {file_digest(data), file_digest(folder)}
