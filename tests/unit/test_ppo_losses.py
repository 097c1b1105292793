"""The PPO stage's tensors on a real tiny model: value alignment, the batch layout the losses read,
and the policy/critic losses at known points."""

from pathlib import Path

import pytest
import torch

from actors.modeling import load_causal_lm, load_reward_model, sequence_scores, token_logprobs, token_values
from actors.rollout import RolloutSample
from orchestrator.config import load_pipeline
from orchestrator.runtime.weight_sync import _probe_batch, _response_rows, probe_token_logps
from pipelines.algorithms.ppo import masked_mean
from pipelines.losses import CriticLoss, PolicyGradientLoss
from pipelines.stages.online import Scored
from pipelines.stages.ppo import advantage_batch

SHIPPED = Path(__file__).resolve().parents[2] / "pipelines" / "ppo.yaml"
SEQUENCES = [([1, 5, 6, 7], [8, 9, 2]), ([1, 5], [8, 2]), ([1, 5, 6], [9]), ([1, 7, 7, 7, 7], [8, 8, 8, 2])]


def test_token_values_are_the_scores_of_each_prefix(tiny_model_dir):
    critic = load_reward_model(str(tiny_model_dir), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 5, 6, 9, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        values = token_values(critic, ids, attn)
        assert values.shape == (2, 5)
        for t in range(5):  # V at column t is the value of the prefix ending at token t
            row = 0 if t >= 3 else slice(None)
            prefix = sequence_scores(critic, ids[:, : t + 1], attn[:, : t + 1])[row]
            assert torch.allclose(values[row, t], prefix, atol=1e-5), t


def _scored(logps):
    samples = [RolloutSample(p, r, "x", lp, "stop" if r[-1] == 2 else "length", 0)
               for (p, r), lp in zip(SEQUENCES, logps, strict=True)]
    return Scored(["q"] * len(samples), samples, [1.0, 0.0, 1.0, 1.0], [[x - 0.1 for x in lp] for lp in logps])


def test_advantage_batch_puts_each_token_where_the_trainer_reads_it(tiny_model_dir):
    cfg = load_pipeline(SHIPPED, ["stages.ppo.algorithm.estimator=rloo",
                                  "stages.ppo.sampling.samples_per_prompt=2"]).stage("ppo")
    model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():  # the rollout path's per-token log-probs (what the stage gets from its roles)
        lps = _response_rows(SEQUENCES, probe_token_logps(model, _probe_batch(SEQUENCES, 0)))
    batch, metrics = advantage_batch(cfg, _scored(lps), lps, None, kl_coef=0.5, pad_id=0)
    with torch.no_grad():
        trainer_view = token_logprobs(model, batch.input_ids, batch.attention_mask)
    mask = batch.action_mask.bool()
    assert mask.sum() == sum(len(r) for _, r in SEQUENCES)
    assert torch.allclose(trainer_view[mask], batch.old_logps[mask], atol=1e-5)
    for i, (p, r) in enumerate(SEQUENCES):
        assert mask[i].nonzero().squeeze(1).tolist() == list(range(len(p) - 1, len(p) + len(r) - 1))
    # k1 KL is 0.1 per token (reference = policy − 0.1): sequence KL = 0.1·|y|, penalty −0.5·that.
    lengths = torch.tensor([len(r) for _, r in SEQUENCES], dtype=torch.float32)
    assert metrics["objective/kl"] == pytest.approx(float(0.1 * lengths.mean()), abs=1e-5)
    assert metrics["objective/non_score_reward"] == pytest.approx(float(-0.05 * lengths.mean()), abs=1e-5)
    assert metrics["objective/rlhf_reward"] == pytest.approx(0.75 - 0.05 * float(lengths.mean()), abs=1e-5)
    # RLOO over pairs: each group's advantages sum to 0 and every token of a response carries its advantage.
    first = torch.stack([batch.advantages[i][mask[i]][0] for i in range(4)])
    assert first.view(2, 2).sum(1).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert batch.ref_logps is None and batch.old_values is None  # KL in the reward, no critic


def _ppo_batch(model, critic=None):
    ids = torch.tensor([[1, 5, 6, 8, 9, 2], [1, 5, 8, 2, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.float32)
    with torch.no_grad():
        old = token_logprobs(model, ids, attn) * mask
        values = token_values(critic, ids, attn) * mask if critic is not None else None
    from pipelines.data.batches import PPOBatch

    adv = torch.tensor([[0, 0, 1.0, 1.0, 1.0], [0, -1.0, -1.0, 0, 0]])
    return PPOBatch(ids, attn, mask, old, adv, ref_logps=old.clone(), old_values=values,
                    returns=None if values is None else values + 0.1)


def test_policy_gradient_loss_at_ratio_one_and_its_gradient(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32)
    batch = _ppo_batch(model)
    loss, metrics = PolicyGradientLoss(clip_eps=0.2, kl_coef=0.3, kl_estimator="k3")(model, batch)
    assert loss.item() == pytest.approx(-masked_mean(batch.advantages, batch.action_mask).item(), abs=1e-6)
    assert metrics["policy/clipfrac"] == 0 and metrics["policy/approxkl"] == pytest.approx(0, abs=1e-10)
    assert metrics["loss/kl"] == pytest.approx(0, abs=1e-7)  # π = π_ref
    loss.backward()
    with torch.no_grad():  # a small SGD step raises Σ A·log π: likelier good tokens, less likely bad ones
        for p in model.parameters():
            p -= 1e-2 * p.grad
        new = token_logprobs(model, batch.input_ids, batch.attention_mask)
    delta = (new - batch.old_logps) * batch.action_mask
    assert (batch.advantages * delta).sum() > 0


def test_critic_loss_regresses_values_to_returns(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32)
    critic = load_reward_model(str(tiny_model_dir), dtype=torch.float32)
    batch = _ppo_batch(model, critic)
    loss, metrics = CriticLoss(clip_eps=0.2)(critic, batch)
    assert loss.item() == pytest.approx(0.5 * 0.01, rel=1e-4)  # every value is 0.1 below its return
    assert metrics["val/clipfrac"] == 0 and metrics["val/vf_loss"] == metrics["loss/value"]
    with pytest.raises(ValueError, match="needs old values and returns"):
        CriticLoss()(critic, _ppo_batch(model))
