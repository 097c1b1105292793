"""The kto stage's parts: its data (unpaired or split pairs, mismatched completions), its loss on a
real model against the pure function, the step metrics averaged over micro-batches, and its config."""

import json
from pathlib import Path

import pytest
import torch

from actors.modeling import load_causal_lm, sequence_logps
from orchestrator.config import load_pipeline
from pipelines.algorithms import kto_loss
from pipelines.data.formats import read_preferences
from pipelines.data.lengths import LengthTally
from pipelines.errors import ConfigError, DataError
from pipelines.losses import KTOLoss
from pipelines.stages.kto import KTOSet, load_rows, mismatched
from pipelines.stages.training import resolve_ratios

SHIPPED = Path(__file__).resolve().parents[2] / "pipelines" / "kto.yaml"


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_pairs_split_into_a_desirable_and_an_undesirable_row_and_unpaired_rows_read_as_they_are(tmp_path):
    pairs = _jsonl(tmp_path / "p.jsonl", [{"q": "1+1=", "good": "2", "bad": "3"},
                                          {"q": "2+2=", "good": "4", "bad": "5"}])
    rows = read_preferences(pairs, {"prompt": "q", "chosen": "good", "rejected": "bad", "completion": "unused"})
    assert (rows.prompt, rows.completion, rows.label, rows.file_rows) == (
        ["1+1=", "1+1=", "2+2=", "2+2="], ["2", "3", "4", "5"], [True, False, True, False], [0, 0, 1, 1])
    unpaired = _jsonl(tmp_path / "u.jsonl", [{"prompt": "1+1=", "answer": "2", "liked": True},
                                             {"prompt": "2+2=", "answer": "7", "liked": False}])
    rows = read_preferences(unpaired, {"completion": "answer", "label": "liked", "chosen": "unused"})
    assert (rows.completion, rows.label, rows.file_rows) == (["2", "7"], [True, False], [0, 1])


def test_every_row_gets_another_rows_completion():
    for n in (2, 3, 10):
        partner = mismatched(n, seed=0)
        assert sorted(partner) == list(range(n)) and all(partner[i] != i for i in range(n))
    assert mismatched(10, seed=0) == mismatched(10, seed=0) != mismatched(10, seed=1)


def test_rows_tokenize_with_their_mismatched_completion_and_errors_name_the_row(tmp_path, tiny_model_dir):
    from pipelines.data.tokens import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    path = _jsonl(tmp_path / "u.jsonl", [{"prompt": "1+1=", "completion": "2", "label": True},
                                         {"prompt": "3+4=", "completion": "sum is 7", "label": False}])
    kto_set, plain = load_rows(path, tok, {}, LengthTally.strict(path, 64), seed=0)
    assert kto_set.desirable.tolist() == [1.0, 0.0] and plain["completion"] == ["2", "sum is 7"]
    a, b = kto_set.rows
    assert a.rejected == b.chosen and b.rejected == a.chosen  # two rows: each other's completion
    with pytest.raises(DataError, match=r"u.jsonl: 1 of 2 rows exceed data.max_length=8 \(the longest: row 2, "):
        load_rows(path, tok, {}, LengthTally.strict(path, 8), seed=0)
    one = _jsonl(tmp_path / "one.jsonl", [{"prompt": "1+1=", "completion": "2", "label": True}])
    with pytest.raises(DataError, match="KTO needs at least 2 rows"):
        load_rows(one, tok, {}, LengthTally.strict(one, 64), seed=0)


def test_kto_loss_on_a_model_is_the_pure_function_with_the_batch_reference_point(tmp_path, tiny_model_dir):
    """KTOLoss: sequence log-probs of the completions (with gradient) and of the mismatched ones
    (without), z0 = max(0, mean(policy − ref) over the mismatched rows), then ``kto_loss``."""
    from pipelines.data.tokens import TokenizedPair

    model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32)
    rows = [TokenizedPair([1, 5, 6], [7, 8, 2], [9, 2]), TokenizedPair([1, 4], [9, 2], [7, 8, 2]),
            TokenizedPair([1, 3, 3], [10, 2], [7, 8, 2])]
    kto_set = KTOSet(rows, torch.tensor([1.0, 0.0, 1.0]), ref=torch.tensor([-9.0, -7.0, -8.0]),
                     ref_kl=torch.tensor([-20.0, -20.0, -20.0]))
    batch = kto_set.batch([0, 1, 2], pad_id=0)
    loss, metrics = KTOLoss(beta=0.5, undesirable_weight=2.0)(model, batch)
    with torch.no_grad():
        policy = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
        kl_policy = sequence_logps(model, batch.kl_input_ids, batch.kl_attention_mask, batch.kl_loss_mask)
    z0 = (kl_policy - batch.ref_kl_logps).mean().clamp(min=0)
    assert z0 > 0 and metrics["kto/kl"] == pytest.approx(float(z0), abs=1e-5)
    want, rewards = kto_loss(policy, batch.ref_logps, batch.desirable, z0, beta=0.5, undesirable_weight=2.0)
    torch.testing.assert_close(loss.detach(), want.mean(), atol=1e-5, rtol=1e-5)
    loss.backward()  # the gradient flows through the completions only
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # the step's desirable / undesirable reward means, as the driver resolves them
    step = resolve_ratios({k: float(v) for k, v in metrics.items()})
    assert step["rewards/desirable"] == pytest.approx(float(rewards[[0, 2]].mean()), abs=1e-5)
    assert step["rewards/undesirable"] == pytest.approx(float(rewards[1]), abs=1e-5)


def test_ratio_metrics_average_over_micro_batches_to_the_step_mean_and_skip_an_absent_kind():
    """Two micro-batches of 2 rows, equal weights: desirable rewards 1 and 3 (one in each) → 2; no
    undesirable row in the step → no undesirable metric."""
    parts = [{"rewards/desirable@num": 1 / 2, "rewards/desirable@den": 1 / 2, "rewards/undesirable@num": 0.0,
              "rewards/undesirable@den": 0.0},
             {"rewards/desirable@num": 3 / 2, "rewards/desirable@den": 1 / 2, "rewards/undesirable@num": 0.0,
              "rewards/undesirable@den": 0.0}]
    averaged = {k: (parts[0][k] + parts[1][k]) / 2 for k in parts[0]}
    assert resolve_ratios(averaged | {"loss": 0.5}) == {"loss": 0.5, "rewards/desirable": 2.0}


def test_shipped_kto_pipeline_reads_the_task_pairs_and_bad_config_names_the_field():
    config = load_pipeline(SHIPPED)
    stage = config.stage("kto")
    assert stage.kto.beta == 0.1 and stage.schedule.examples_per_step == 32
    with pytest.raises(ConfigError, match=r"data.columns: unknown field\(s\) \['answer'\]"):
        load_pipeline(SHIPPED, ["stages.kto.data.columns={answer: x}"])
    with pytest.raises(ConfigError, match="schedule.examples_per_microbatch: 32 does not divide"):
        load_pipeline(SHIPPED, ["stages.kto.schedule.examples_per_step=33"])
    with pytest.raises(ConfigError, match=r"output task.sft_train is a sft, but a preferences is needed"):
        load_pipeline(SHIPPED, ["stages.kto.data.train={from: task, output: sft_train}"])


def test_upo_on_kto_weights_the_likelihood_of_the_completions_and_of_the_desirable_ones_only_when_asked(tiny_model_dir):
    from pipelines.algorithms.upo import auxiliary_loss
    from pipelines.data.tokens import TokenizedPair

    model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32)
    rows = [TokenizedPair([1, 5], [7, 2], [9, 2]), TokenizedPair([1, 4], [9, 2], [7, 2])]
    kto_set = KTOSet(rows, torch.tensor([1.0, 0.0]), ref=torch.tensor([-5.0, -5.0]), ref_kl=torch.tensor([-5.0, -5.0]),
                     aux_rewards=torch.tensor([[1.0], [0.0]]), aux_weights=torch.tensor([2.0, 3.0]))
    batch = kto_set.batch([0, 1], pad_id=0)
    with torch.no_grad():
        logps = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
    for preferred, weights in ((False, [2.0, 3.0]), (True, [2.0, 0.0])):
        loss, metrics = KTOLoss(beta=0.1, upo_coef=0.5, aux_names=("r",), preferred_only=preferred)(model, batch)
        want = auxiliary_loss(logps, batch.lengths(), torch.tensor(weights))
        torch.testing.assert_close(metrics["loss/aux"], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss.detach(), metrics["loss/pref"] + 0.5 * want, atol=1e-5, rtol=1e-5)
