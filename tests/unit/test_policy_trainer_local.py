"""PolicyTrainer as a plain class (no Ray): accumulation is exact, NaN stops training loudly, a saved
state resumes training exactly."""

import math

import pytest
import torch

from pipelines.losses import DPOLoss


def test_gradient_accumulation_matches_one_big_microbatch(trainers, batch):
    whole, accumulated = trainers(8), trainers(2)
    for _ in range(3):
        m_whole = whole.train_step(batch, DPOLoss(beta=0.1))
        m_acc = accumulated.train_step(batch, DPOLoss(beta=0.1))
        assert m_whole["loss"] == pytest.approx(m_acc["loss"], abs=1e-5)
        assert m_whole["grad_norm"] == pytest.approx(m_acc["grad_norm"], rel=1e-4)
        assert m_whole["peak_rss_mib"] > 100  # the process holds torch and the model: its peak is reported
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


LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"}


@pytest.mark.parametrize("zero_stage, lora", [(0, None), (2, None), (2, LORA)], ids=["zero0", "zero2", "zero2-lora"])
def test_saved_state_resumes_training_exactly(trainers, batch, tmp_path, zero_stage, lora):
    """Two steps, save, two more steps; a fresh trainer loading the save takes the same two steps to
    bit-identical weights (model, fp32 master, Adam moments, LR schedule mid-warmup and step count).
    With LoRA the save holds the adapters only and the merged weights come out identical. ZeRO-2 keeps
    its partitioned fp32 master copy here (``partition_one_rank``), as it does on several ranks."""
    spec = {"schedule": "cosine", "warmup_steps": 3, "zero_stage": zero_stage, "total_steps": 6, "lora": lora,
            "partition_one_rank": True}
    first = trainers(4, **spec)
    for _ in range(2):
        first.train_step(batch, DPOLoss(beta=0.1))
    first.save_state(str(tmp_path / "state"))
    assert {p.suffix for p in (tmp_path / "state").iterdir()} == {".safetensors", ".json"}  # nothing pickled
    continued = [first.train_step(batch, DPOLoss(beta=0.1)) for _ in range(2)]

    resumed = trainers(4, **spec)
    assert resumed.weights_digest() != first.weights_digest()
    assert resumed.load_state(str(tmp_path / "state")) == 2
    replayed = [resumed.train_step(batch, DPOLoss(beta=0.1)) for _ in range(2)]
    for a, b in zip(continued, replayed):
        assert (a["loss"], a["lr"]) == (b["loss"], b["lr"])
        assert a["grad_norm"] == b["grad_norm"] or math.isnan(a["grad_norm"]) and math.isnan(b["grad_norm"])
    assert resumed.weights_digest() == first.weights_digest()
    assert resumed.steps_done == first.steps_done == 4
    assert resumed.zero_stage == zero_stage


def test_one_fp32_rank_runs_zero_stage_0(trainers, batch):
    """A lone fp32 rank asked for ZeRO-2 runs stage 0 (nothing to partition) and steps the same AdamW:
    two steps from the same start give the same loss and weights as the partitioned ZeRO-2 engine."""
    plain = trainers(4, zero_stage=2)
    partitioned = trainers(4, zero_stage=2, partition_one_rank=True)
    assert (plain.zero_stage, partitioned.zero_stage) == (0, 2)
    assert not hasattr(plain.engine.optimizer, "single_partition_of_fp32_groups")
    for _ in range(2):
        a, b = (t.train_step(batch, DPOLoss(beta=0.1)) for t in (plain, partitioned))
        assert abs(a["loss"] - b["loss"]) < 1e-6
    for (name, p), (_, q) in zip(plain.engine.module.named_parameters(), partitioned.engine.module.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_state_of_another_world_size_is_refused(trainers, tmp_path):
    trainer = trainers(8)
    trainer.save_state(str(tmp_path / "state"))
    meta = tmp_path / "state" / "rank0.json"
    meta.write_text(meta.read_text().replace('"world_size": 1', '"world_size": 2'))
    with pytest.raises(ValueError, match="written by 2 rank"):
        trainer.load_state(str(tmp_path / "state"))


def test_lora_trainer_with_adapters_disabled_is_the_starting_model(trainers, batch, tiny_model_dir):
    """``evaluate_base`` (the reference of a LoRA stage without a reference group) gives the starting
    model's log-probs after training, while ``evaluate`` gives the trained ones."""
    from actors.modeling import preference_logps
    from actors.reference import ReferenceModel

    trainer = trainers(8, lr=1e-2, lora=LORA)
    for _ in range(3):
        trainer.train_step(batch, DPOLoss(beta=0.1))
    reference = ReferenceModel(0, 1, str(tiny_model_dir), precision="fp32")
    reference.setup()
    want = reference.evaluate(batch, preference_logps)
    base = trainer.evaluate_base(batch, preference_logps)
    trained = trainer.evaluate(batch, preference_logps)
    for w, b, t in zip(want, base, trained, strict=True):
        torch.testing.assert_close(b, w, rtol=0, atol=1e-5)
        assert (t - w).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs a LoRA trainer"):
        trainers(8).evaluate_base(batch, preference_logps)


def test_lora_reward_trainer_fits_a_batch(trainers, batch):
    """A reward model (or critic) with LoRA: adapters and the score head train, and fit a batch."""
    from pipelines.losses import RewardModelLoss

    trainer = trainers(8, lr=3e-3, lora=LORA, model_kind="reward_model", total_steps=20)
    losses = [trainer.train_step(batch, RewardModelLoss(0.0))["loss"] for _ in range(20)]
    assert losses[-1] < 0.3 * losses[0], losses


def test_token_budget_microbatches_take_the_same_step_with_less_padding(trainers, batch):
    """Rows packed by a token budget (micro-batches of different sizes, each loss weighted by its rows)
    take the step one whole batch takes; the measured padding share falls."""
    whole, packed = trainers(8), trainers(2, tokens_per_microbatch=48)
    for _ in range(2):
        m_whole = whole.train_step(batch, DPOLoss(beta=0.1))
        m_packed = packed.train_step(batch, DPOLoss(beta=0.1))
        assert m_whole["loss"] == pytest.approx(m_packed["loss"], abs=1e-5)
        assert m_whole["grad_norm"] == pytest.approx(m_packed["grad_norm"], rel=1e-4)
    assert len(packed._microbatches(batch)) > 1
    assert 0 <= m_packed["data/pad_fraction"] < m_whole["data/pad_fraction"]
    for a, b in zip(whole.engine.module.parameters(), packed.engine.module.parameters()):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)  # summation order, through Adam
