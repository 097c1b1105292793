"""Reward-model plumbing on the real tiny Llama: init from a causal LM, last-token scores, the loss
callable, the checkpoint scorer (with stored stats) and SFT loss masking."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.modeling import load_reward_model, pair_scores, sequence_logps, sequence_scores
from actors.reward import STATS_FILE, RewardModelScorer, build_reward
from pipelines.algorithms.reward_model import bradley_terry_loss, reward_metrics
from pipelines.data.sft import collate_sft, tokenize_sft
from pipelines.data.tokens import collate_pairs, tokenize_pairs
from pipelines.errors import RewardError
from pipelines.losses import RewardModelLoss, SFTLoss

ROWS = {"prompt": ["1+2=", "13+4=", "22+31="], "chosen": ["3", "17", "53"], "rejected": ["4", "27", "5"]}


@pytest.fixture(scope="module")
def rm(tiny_model_dir):
    torch.manual_seed(0)
    return load_reward_model(str(tiny_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pairs(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return collate_pairs(tokenize_pairs(ROWS, tok, max_length=16, source="rows"), tok.pad_token_id)


def test_reward_model_starts_from_the_causal_lm_trunk(tiny_model_dir, rm):
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for name, param in lm.model.state_dict().items():
        torch.testing.assert_close(rm.model.state_dict()[name], param)
    assert rm.score.out_features == 1


def test_score_is_read_at_the_last_attended_token_whatever_the_padding(rm, pairs):
    with torch.no_grad():
        batched = sequence_scores(rm, pairs.chosen_input_ids, pairs.chosen_attention_mask)
        for i in range(3):
            n = int(pairs.chosen_attention_mask[i].sum())
            alone = sequence_scores(rm, pairs.chosen_input_ids[i : i + 1, :n], torch.ones(1, n, dtype=torch.long))
            assert batched[i].item() == pytest.approx(alone.item(), abs=1e-5)
        # Padding with the EOS id (pad = EOS, common in real tokenizers) must not move the read position.
        eos_padded = pairs.chosen_input_ids.masked_fill(pairs.chosen_attention_mask == 0, 2)
        torch.testing.assert_close(sequence_scores(rm, eos_padded, pairs.chosen_attention_mask), batched)


def test_reward_loss_callable_matches_the_pure_functions(rm, pairs):
    pairs.margin = torch.tensor([0.0, 0.5, 2.0])
    loss, metrics = RewardModelLoss(centering_coef=0.1)(rm, pairs)
    chosen, rejected = pair_scores(rm, pairs)
    expected = bradley_terry_loss(chosen, rejected, pairs.margin).mean() + 0.1 * ((chosen + rejected) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["accuracy"].item() == pytest.approx(((chosen > rejected).float().mean()).item())
    pairs.margin = None


def test_reward_metrics_by_hand():
    m = reward_metrics(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert m["accuracy"].item() == 0.5
    assert m["margin"].item() == 0.0
    assert m["reward/mean"].item() == 1.0
    assert m["reward/std"].item() == pytest.approx((0.5) ** 0.5)


def test_checkpoint_scorer_matches_direct_scores_and_normalises(tiny_model_dir, rm, pairs, tmp_path):
    ckpt = tmp_path / "rm"
    rm.save_pretrained(ckpt, safe_serialization=True)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, ckpt / f.name)
    scorer = build_reward(model_path=str(ckpt))
    scores = scorer.score(ROWS["prompt"], ROWS["chosen"])
    with torch.no_grad():
        direct = sequence_scores(rm, pairs.chosen_input_ids, pairs.chosen_attention_mask)
    assert scores == pytest.approx(direct.tolist(), abs=1e-5)
    with pytest.raises(RewardError, match="normalize is on but reward_stats.json is missing"):
        RewardModelScorer(0, 1, str(ckpt), normalize=True).setup()
    (ckpt / STATS_FILE).write_text(json.dumps({"mean": 1.0, "std": 2.0}))
    normalised = RewardModelScorer(0, 1, str(ckpt), normalize=True).score(ROWS["prompt"], ROWS["chosen"])
    assert normalised == pytest.approx([(s - 1.0) / 2.0 for s in scores], abs=1e-5)


def test_build_reward_needs_exactly_one_source():
    with pytest.raises(RewardError, match="exactly one"):
        build_reward()
    with pytest.raises(RewardError, match="cannot import module"):
        build_reward(function="no_such_module_abc:fn")


def test_sft_loss_ignores_prompt_tokens(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples = tokenize_sft([("12+3=", "15"), ("1+1=", "2")], tok, max_length=16, source="rows")
    batch = collate_sft(examples, tok.pad_token_id)
    loss, metrics = SFTLoss()(lm, batch)
    with torch.no_grad():
        summed = sequence_logps(lm, batch.input_ids, batch.attention_mask, batch.loss_mask)
        hits = lm(input_ids=batch.input_ids).logits[:, :-1].argmax(-1) == batch.input_ids[:, 1:]
    assert loss.item() == pytest.approx((-summed.sum() / batch.loss_mask[:, 1:].sum()).item(), rel=1e-5)
    mask = batch.loss_mask[:, 1:].bool()
    assert metrics["token_accuracy"].item() == pytest.approx(hits[mask].float().mean().item())
