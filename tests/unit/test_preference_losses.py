"""KTO, SimPO and ORPO (issue contracts, importable from pipelines.algorithms) against hand-computed
values, with their reductions: λ = 0, γ = 0, ε = 0."""

import pytest
import torch

from pipelines.algorithms import kto_loss, orpo_loss, simpo_loss


def test_kto_against_hand_values():
    # r = policy − ref = [0.5, −0.5]; z0 = 0.2, β = 0.5
    losses, rewards = kto_loss(torch.tensor([-2.0, -3.0]), torch.tensor([-2.5, -2.5]), torch.tensor([True, False]),
                               0.2, beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    # desirable: 1 − σ(0.5·(0.5 − 0.2)); undesirable: 1.5·(1 − σ(0.5·(0.2 + 0.5)))
    torch.testing.assert_close(losses, torch.tensor([0.4625701546562504, 0.6200736316240048]))
    torch.testing.assert_close(rewards, torch.tensor([0.25, -0.25]))


def test_kto_gradient_does_not_reach_the_reference_point():
    policy = torch.tensor([-2.0], requires_grad=True)
    kl = torch.tensor(0.3, requires_grad=True)
    losses, _ = kto_loss(policy, torch.tensor([-2.0]), torch.tensor([True]), kl.detach(), beta=1.0)
    losses.sum().backward()
    assert policy.grad is not None and policy.grad.item() < 0  # raising a desirable log-prob lowers the loss
    assert kl.grad is None
    with pytest.raises(ValueError, match="beta must be > 0"):
        kto_loss(policy, policy, torch.tensor([True]), 0.0, beta=0.0)


def test_simpo_against_hand_values_and_its_reductions():
    pc, pr, lc, lr = torch.tensor([-4.0]), torch.tensor([-9.0]), torch.tensor([2.0]), torch.tensor([3.0])
    # x = 2·(−4/2 + 9/3) − 0.5 = 1.5; −0.9·logσ(1.5) − 0.1·logσ(−1.5)
    losses, chosen, rejected = simpo_loss(pc, pr, beta=2.0, gamma=0.5, chosen_lengths=lc, rejected_lengths=lr,
                                          label_smoothing=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.35141327798275246]))
    torch.testing.assert_close((chosen, rejected), (torch.tensor([-4.0]), torch.tensor([-6.0])))
    # γ = 0, ε = 0: −logσ(β·(a_w − a_l)) = −logσ(2)
    plain, _, _ = simpo_loss(pc, pr, beta=2.0, gamma=0.0, chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(plain, torch.tensor([0.1269280110429725]))


def test_orpo_against_hand_values_and_lambda_zero():
    pc, pr, n = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([2.0])
    # a_w = −0.5, a_l = −1.5: log odds = 1 − (log(1 − e^−0.5) − log(1 − e^−1.5))
    losses, log_odds = orpo_loss(pc, pr, lam=0.5, chosen_lengths=n, rejected_lengths=n)
    torch.testing.assert_close(log_odds, torch.tensor([1.6802696706417346]))
    torch.testing.assert_close(losses, torch.tensor([0.5854296085732392]))
    sft, _ = orpo_loss(pc, pr, lam=0.0, chosen_lengths=n, rejected_lengths=n)  # λ = 0: −a_w
    torch.testing.assert_close(sft, torch.tensor([0.5]))


def test_orpo_stays_finite_as_the_mean_log_prob_reaches_zero():
    for tiny in (-1e-3, -1e-9, 0.0):
        pc = torch.tensor([tiny * 4], requires_grad=True)
        losses, log_odds = orpo_loss(pc, torch.tensor([-8.0]), lam=0.1, chosen_lengths=torch.tensor([4.0]),
                                     rejected_lengths=torch.tensor([4.0]))
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(log_odds).all() and torch.isfinite(pc.grad).all(), tiny


def _pairs_batch():
    from pipelines.data.tokens import TokenizedPair, collate_pairs
    return collate_pairs([TokenizedPair([1, 2], [3, 4, 5], [6]), TokenizedPair([1], [7], [8, 9])], pad_id=0)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_the_stage_loss_of_a_reference_free_type_reads_no_reference_and_matches_the_pure_function(loss_type):
    """``DPOLoss`` with simpo / orpo trains on a batch without reference log-probs (none is computed
    for them) and gives the pure function's loss; a reference-based type still refuses such a batch."""
    from pipelines.losses import DPOLoss

    batch = _pairs_batch()
    assert batch.ref_chosen_logps is None
    pc, pr = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0])
    lc, lr = batch.chosen_lengths(), batch.rejected_lengths()
    loss, metrics = DPOLoss(2.0, loss_type, gamma=0.5, lam=0.3).terms(pc, pr, batch)
    if loss_type == "simpo":
        want, _, _ = simpo_loss(pc, pr, beta=2.0, gamma=0.5, chosen_lengths=lc, rejected_lengths=lr)
    else:
        want, log_odds = orpo_loss(pc, pr, lam=0.3, chosen_lengths=lc, rejected_lengths=lr)
        torch.testing.assert_close(metrics["orpo/log_odds"], log_odds.mean())
    torch.testing.assert_close(loss, want.mean())
    # the rewards are per token: pair 0's chosen side has the lower sum (−3 < −2) but the higher
    # mean (−1 > −2), so both pairs rank right by reward while the summed log-probs rank one
    assert metrics["rewards/accuracies"].item() == 1.0 and metrics["ranking_accuracy"].item() == 0.5
    with pytest.raises(ValueError, match="needs reference log-probs"):
        DPOLoss(0.1, "sigmoid").terms(pc, pr, batch)
