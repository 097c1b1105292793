"""pipelines/upo.yaml end to end on real Ray, DeepSpeed, transformers, pyarrow and MLflow, shortened:
one SFT model, then plain DPO and UPO on the same pairs for the same steps."""

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import load_pipeline
from orchestrator.runner import run_pipeline
from pipelines.stages.auxiliary import CACHE_FILE
from pipelines.tasks.arithmetic import sentence
from tests.e2e.mlflow_reads import metric_history

ROOT = Path(__file__).resolve().parents[2]
STEPS = 24


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_upo_pipeline_trains_dpo_and_upo_on_the_same_pairs(ray_local, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    short = [f"stages.{s}.{k}" for s in ("dpo", "upo") for k in (
        f"schedule.steps={STEPS}", "schedule.eval_every=0", "optim.warmup_steps=0")]
    config = load_pipeline(ROOT / "pipelines" / "upo.yaml", [
        f"run_dir={tmp_path / 'runs'}", f"tracking.uri={uri}", "tracking.log_checkpoints=false",
        "stages.task.num_sft=1000", "stages.task.num_pairs=512", "stages.task.num_eval=32",
        "stages.sft.schedule.steps=80", "stages.sft.schedule.eval_every=0", *short,
    ])
    result = run_pipeline(config, quiet=True)
    client = MlflowClient(uri)
    stages = {s.name: s for s in result.stages}
    assert list(stages) == ["task", "sft", "dpo", "upo"]
    children = client.search_runs([client.get_run(result.mlflow_run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'")
    assert sorted(r.info.run_name for r in children) == ["dpo", "sft", "task", "upo"]
    assert all(r.info.status == "FINISHED" for r in children)

    dpo, upo = (metric_history(client, stages[n].run_id) for n in ("dpo", "upo"))
    coef = config.stage("upo").upo.coef
    for history in (dpo, upo):
        for name in ["loss", "loss/pref", "loss/aux", "aux/sentence_mean", "aux/weight_mean", "aux/weight_max",
                     "eval/aux/sentence_mean", "eval/aux/weighted_mean", "eval/exact_match",
                     "aux/data_sentence_mean", "aux/data_weight_max"]:
            assert name in history and all(math.isfinite(v) for v in history[name]), name
        assert len(history["loss"]) == STEPS
    # the same pairs at every step; λ = 0 is DPO exactly, λ > 0 adds λ·L_aux
    assert dpo["aux/sentence_mean"] == upo["aux/sentence_mean"]
    assert dpo["loss"] == dpo["loss/pref"]
    for total, pref, aux in zip(upo["loss"], upo["loss/pref"], upo["loss/aux"], strict=True):
        assert total == pytest.approx(pref + coef * aux, rel=1e-5)
    assert 0.3 < upo["aux/data_sentence_mean"][0] < 0.7  # half the training responses are sentences
    assert upo["aux/data_weight_max"][0] > 1.0

    # every training response scored once, cached with the run; held-out generations scored too
    cache = pq.read_table(Path(stages["upo"].outputs["model"]).parent / CACHE_FILE).to_pydict()
    assert len(cache["prompt"]) == 512
    for side in ("chosen", "rejected"):
        assert cache[f"{side}_sentence"] == sentence(cache["prompt"], cache[side])
    generations = pq.read_table(Path(stages["upo"].outputs["model"]).parent / "eval_generations.parquet").to_pydict()
    assert generations["aux_sentence"] == sentence(generations["prompt"], generations["generated"])
    assert upo["eval/aux/sentence_mean"][-1] == sum(generations["aux_sentence"]) / len(generations["aux_sentence"])
