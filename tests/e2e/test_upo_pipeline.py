"""pipelines/upo.yaml end to end on real Ray, DeepSpeed, transformers, pyarrow and MLflow, shortened:
one SFT model, then plain DPO and UPO on the same pairs for the same steps, UPO on two data-parallel
ranks. This test also carries the offline-DPO lineage checks (MLflow parent/child, checkpoint
artifact, reload of the saved model)."""

import copy
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.modeling import preference_logps
from orchestrator.config import load_pipeline, read_yaml
from orchestrator.runner import run_pipeline
from pipelines.data.formats import PAIR_FIELDS
from pipelines.data.sources import read_columns
from pipelines.data.tokens import collate_pairs, tokenize_pairs
from pipelines.stages.auxiliary import CACHE_FILE
from pipelines.tasks.arithmetic import sentence
from tests.e2e.mlflow_reads import metric_history

ROOT = Path(__file__).resolve().parents[2]
STEPS = 24
KTO_STEPS = 48  # KTO moves the held-out ranking more slowly per step here (measured: margin 0.13 after 48 steps)
REQUIRED_METRICS = [  # every offline-DPO metric, beside the UPO ones
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
    "logps/rejected", "grad_norm", "lr", "throughput/pairs_per_s", "throughput/tokens_per_s",
    "eval/rewards/accuracies", "eval/ranking_accuracy",
]


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _with_more_arms(tmp_path: Path) -> Path:
    """pipelines/upo.yaml plus, from the same SFT model and pairs, UPO on KTO with the value baseline
    (the paper's main variant: the pairs split into desirable and undesirable rows, V(x) fitted by
    expectile regression) and reference-free SimPO."""
    raw = read_yaml(ROOT / "pipelines" / "upo.yaml")
    upo = next(s for s in raw["stages"] if s["name"] == "upo")
    common = copy.deepcopy({k: upo[k] for k in ("policy", "data", "generation", "optim", "trainer")})
    raw["stages"] += [
        {"name": "kto_upo", "kind": "kto", **copy.deepcopy(common), "kto": {"beta": 0.1},
         **copy.deepcopy({k: upo[k] for k in ("auxiliary", "reward_group")}),
         "upo": {**upo["upo"], "baseline": "value", "expectile": 0.7},  # the paper's value baseline
         "schedule": {"steps": STEPS, "examples_per_step": 32, "examples_per_microbatch": 32}},
        {"name": "simpo", "kind": "offline_dpo", **common, "generation": {"enabled": False},
         "dpo": {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5},
         "schedule": {"steps": STEPS, "pairs_per_step": 32, "pairs_per_microbatch": 32}},
    ]
    path = tmp_path / "upo_arms.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_upo_pipeline_trains_dpo_and_upo_on_the_same_pairs(ray_local, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    short = [f"stages.{s}.{k}" for s in ("dpo", "upo", "kto_upo", "simpo") for k in (
        f"schedule.steps={STEPS if s != 'kto_upo' else KTO_STEPS}", "schedule.eval_every=0", "optim.warmup_steps=0")]
    config = load_pipeline(_with_more_arms(tmp_path), [
        f"run_dir={tmp_path / 'runs'}", f"tracking.uri={uri}",
        "stages.task.num_sft=1000", "stages.task.num_pairs=512", "stages.task.num_eval=32",
        "stages.sft.schedule.steps=60", "stages.sft.schedule.eval_every=0", *short,
        # UPO over two data-parallel DeepSpeed ranks (the weights and auxiliary fields shard with the pairs)
        "stages.upo.trainer.num_workers=2", "stages.upo.trainer.cpus_per_worker=0.875",
        "stages.upo.schedule.pairs_per_microbatch=8",
        # and micro-batches by a token budget: as many per rank, whatever each rank's lengths
        "stages.upo.trainer.tokens_per_microbatch=160",
    ])
    result = run_pipeline(config, quiet=True)
    client = MlflowClient(uri)
    stages = {s.name: s for s in result.stages}
    assert list(stages) == ["task", "sft", "dpo", "upo", "kto_upo", "simpo"]
    children = client.search_runs([client.get_run(result.mlflow_run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'")
    assert sorted(r.info.run_name for r in children) == ["dpo", "kto_upo", "sft", "simpo", "task", "upo"]
    assert all(r.info.status == "FINISHED" for r in children)

    dpo, upo = (metric_history(client, stages[n].run_id) for n in ("dpo", "upo"))
    coef = config.stage("upo").upo.coef
    for history in (dpo, upo):
        for name in ["loss", "loss/pref", "loss/aux", "aux/sentence_mean", "aux/weight_mean", "aux/weight_max",
                     "eval/aux/sentence_mean", "eval/aux/weighted_mean", "eval/exact_match", "data/pad_fraction",
                     "aux/data_sentence_mean", "aux/data_weight_max", *REQUIRED_METRICS]:
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
    assert len(cache["prompt"]) == 2 * 512  # each pair's chosen, then each pair's rejected response
    assert cache["sentence"] == sentence(cache["prompt"], cache["response"])
    generations = pq.read_table(Path(stages["upo"].outputs["model"]).parent / "eval_generations.parquet").to_pydict()
    assert generations["aux_sentence"] == sentence(generations["prompt"], generations["generated"])
    assert upo["eval/aux/sentence_mean"][-1] == sum(generations["aux_sentence"]) / len(generations["aux_sentence"])

    # Both ranks end with identical weights; the stage's MLflow lineage; the checkpoint reloads and
    # reproduces the logged held-out log-probs.
    upo_dir = Path(stages["upo"].outputs["model"]).parent
    digests = json.loads((upo_dir / "rank_digests.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]
    parent = client.get_run(result.mlflow_run_id)
    assert client.get_experiment(parent.info.experiment_id).name == "upo"
    assert parent.data.params["stages.upo.upo.coef"] == str(coef)
    child = next(r for r in children if r.info.run_name == "upo")
    assert child.data.params["plan.gradient_accumulation_steps"] == "2"
    assert child.data.tags["output.model"] == stages["upo"].outputs["model"]
    assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == list(range(1, STEPS + 1))
    assert "checkpoints/model/model.safetensors" in {
        a.path for a in client.list_artifacts(child.info.run_id, "checkpoints/model")}
    assert any(a.path == "pipeline.resolved.yaml" for a in client.list_artifacts(parent.info.run_id))
    model = AutoModelForCausalLM.from_pretrained(stages["upo"].outputs["model"])
    tok = AutoTokenizer.from_pretrained(stages["upo"].outputs["model"])
    rows = read_columns(stages["task"].outputs["pairs_eval"], list(PAIR_FIELDS), "pairs")
    batch = collate_pairs(tokenize_pairs(rows, tok, max_length=128, source="eval"), tok.pad_token_id)
    with torch.no_grad():
        chosen, rejected = preference_logps(model.eval(), batch)
    assert chosen.mean().item() == pytest.approx(upo["eval/logps/chosen"][-1], abs=1e-3)
    assert rejected.mean().item() == pytest.approx(upo["eval/logps/rejected"][-1], abs=1e-3)

    # UPO on KTO: the KTO terms, the auxiliary term on the completions, the held-out pairs ranked by
    # the implicit reward (0 at step 0, where π = π_ref) and the tie accuracy of UPO
    kto = metric_history(client, stages["kto_upo"].run_id)
    for name in ["loss", "loss/pref", "loss/aux", "kto/kl", "rewards/desirable", "rewards/undesirable",
                 "aux/sentence_mean", "aux/weight_mean", "aux/data_weight_max", "eval/rewards/accuracies",
                 "eval/aux/sentence_mean", "eval/exact_match", "data/desirable_fraction", "upo/value_loss",
                 "upo/value_explained_variance"]:
        assert name in kto and all(math.isfinite(v) for v in kto[name]), name
    kto_coef = config.stage("kto_upo").upo.coef
    for total, pref, aux in zip(kto["loss"], kto["loss/pref"], kto["loss/aux"], strict=True):
        assert total == pytest.approx(pref + kto_coef * aux, rel=1e-5)
    assert kto["data/desirable_fraction"] == [0.5] and kto["eval/rewards/margins"][0] == 0.0
    assert kto["eval/rewards/margins"][-1] > 0, kto["eval/rewards/margins"]  # the right answers rank higher
    assert all(v >= 0 for v in kto["kto/kl"])
    # the value sees the prompt: the sentence style is chosen per response, so it explains little, but
    # it is fitted (a positive share), and responses above it weigh more than 1
    assert kto["upo/value_explained_variance"][0] > 0 and kto["aux/data_weight_max"][0] > 1

    # SimPO: no reference log-probs computed or planned; it learns the held-out pairs' ranking
    simpo_dir = Path(stages["simpo"].outputs["model"]).parent
    assert not (simpo_dir / "ref_logps.parquet").exists()
    simpo_run = next(r for r in children if r.info.run_name == "simpo")
    assert simpo_run.data.params["plan.reference_logprobs"] == "none (dpo.loss_type simpo is reference-free)"
    simpo = metric_history(client, stages["simpo"].run_id)
    assert simpo["eval/rewards/margins"][-1] > simpo["eval/rewards/margins"][0]
