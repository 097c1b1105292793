"""PolicyTrainer as a plain class (no Ray): accumulation is exact, NaN stops training loudly."""

import os

import pytest
import torch
from transformers import AutoTokenizer

from actors.modeling import preference_logps
from actors.policy_trainer import PolicyTrainer, TrainerSpec, free_port
from pipelines.data import collate_pairs, tokenize_pairs
from pipelines.losses import DPOLoss

ROWS = {
    "prompt": [f"{a}+{b}=" for a, b in [(1, 2), (13, 4), (22, 31), (7, 7), (40, 9), (3, 30), (11, 11), (5, 45)]],
    "chosen": ["3", "17", "53", "14", "49", "33", "22", "50"],
    "rejected": ["4", "27", "52", "41", "59", "3", "21", "60"],
}


@pytest.fixture(scope="module")
def trainers(tiny_model_dir):
    port = free_port()
    saved_env = dict(os.environ)  # setup() sets MASTER_ADDR/RANK/...; keep them out of later tests
    made = []

    def make(micro: int, lr: float = 1e-3) -> PolicyTrainer:
        spec = TrainerSpec(model_path=str(tiny_model_dir), total_steps=4, examples_per_step=8,
                           examples_per_microbatch=micro, lr=lr, schedule="constant", zero_stage=2)
        trainer = PolicyTrainer(0, 1, spec)
        trainer.setup("127.0.0.1", port)
        made.append(trainer)
        return trainer

    yield make
    made[0].shutdown()
    os.environ.clear()
    os.environ.update(saved_env)


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    b = collate_pairs(tokenize_pairs(ROWS, tok, max_length=16, source="rows"), tok.pad_token_id)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        b.ref_chosen_logps, b.ref_rejected_logps = preference_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir), b)
    return b


def test_gradient_accumulation_matches_one_big_microbatch(trainers, batch):
    whole, accumulated = trainers(8), trainers(2)
    for _ in range(3):
        m_whole = whole.train_step(batch, DPOLoss(beta=0.1))
        m_acc = accumulated.train_step(batch, DPOLoss(beta=0.1))
        assert m_whole["loss"] == pytest.approx(m_acc["loss"], abs=1e-5)
        assert m_whole["grad_norm"] == pytest.approx(m_acc["grad_norm"], rel=1e-4)
    for a, b in zip(whole.engine.module.parameters(), accumulated.engine.module.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_non_finite_loss_raises(trainers, batch):
    trainer = trainers(8)

    def nan_loss(model, micro):
        loss, metrics = DPOLoss(beta=0.1)(model, micro)
        return loss * float("nan"), metrics

    with pytest.raises(FloatingPointError, match="non-finite loss"):
        trainer.train_step(batch, nan_loss)


def test_wrong_shard_size_is_rejected(trainers, batch):
    with pytest.raises(ValueError, match="got 4 rows, expected 8"):
        trainers(8).train_step(batch.slice(0, 4), DPOLoss(beta=0.1))


def test_weight_buckets_carry_exactly_their_own_bytes(trainers):
    """ZeRO-2 parameters are views into one flat buffer: a bucket must not pickle the whole buffer."""
    import pickle

    trainer = trainers(8)
    plan = trainer.bucket_plan(256 * 1024)
    buckets = trainer.weight_buckets(plan)
    assert len(plan) > 1 and len(buckets) == len(plan)
    assert sorted(n for b in buckets for n in b) == sorted(trainer.engine.module.state_dict())
    for bucket in buckets:
        nbytes = sum(t.numel() * t.element_size() for t in bucket.values())
        assert len(pickle.dumps(bucket)) < 1.1 * nbytes + 4096
