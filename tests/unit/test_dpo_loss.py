"""DPO-family losses pinned against closed forms and hand-computed values."""

import math

import pytest
import torch

from pipelines.algorithms.dpo import chosen_nll, dpo_loss, preference_metrics

BETA = 0.1


def _equal_logps(n=3):
    pc = torch.tensor([-3.0, -5.0, -1.5][:n])
    pr = torch.tensor([-4.0, -2.0, -7.0][:n])
    return pc, pr, pc.clone(), pr.clone()


@pytest.mark.parametrize(
    "loss_type,expected",
    [("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", 1 / (4 * BETA**2)), ("robust", math.log(2))],
)
def test_value_at_policy_equals_reference(loss_type, expected):
    pc, pr, rc, rr = _equal_logps()
    lengths = torch.tensor([2.0, 3.0, 4.0])
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=loss_type,
                              label_smoothing=0.1 if loss_type == "robust" else 0.0,
                              chosen_lengths=lengths, rejected_lengths=lengths)
    torch.testing.assert_close(losses, torch.full((3,), expected))
    assert torch.all(cr == 0) and torch.all(rj == 0)


def test_sigmoid_gradient_wrt_delta():
    # L = -log σ(βΔ)  ⇒  dL/dΔ = -β σ(-βΔ).
    for delta_value in (-2.0, 0.0, 0.7, 5.0):
        delta = torch.tensor([delta_value], requires_grad=True)
        zero = torch.zeros(1)
        losses, _, _ = dpo_loss(delta, zero, zero, zero, beta=BETA)
        losses.sum().backward()
        expected = -BETA * torch.sigmoid(torch.tensor(-BETA * delta_value))
        torch.testing.assert_close(delta.grad, expected.reshape(1))


def test_hand_computed_values():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    # h_w = [1, 0], h_l = [-1, 1], Δ = [2, -1]; β = 0.5 ⇒ βΔ = [1, -0.5].
    beta = 0.5
    sig, cr, rj = dpo_loss(pc, pr, rc, rr, beta=beta)
    torch.testing.assert_close(sig, torch.tensor([math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))]))
    torch.testing.assert_close(cr, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(rj, torch.tensor([-0.5, 0.5]))

    hinge, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")
    torch.testing.assert_close(hinge, torch.tensor([0.0, 1.5]))

    eps = 0.2
    cdpo, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    def ls(x):
        return -math.log1p(math.exp(-x))  # log σ(x)
    torch.testing.assert_close(cdpo, torch.tensor([-(0.8) * ls(1.0) - 0.2 * ls(-1.0),
                                                   -(0.8) * ls(-0.5) - 0.2 * ls(0.5)]))

    robust, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=eps)
    torch.testing.assert_close(robust, torch.tensor([(-(0.8) * ls(1.0) + 0.2 * ls(-1.0)) / 0.6,
                                                     (-(0.8) * ls(-0.5) + 0.2 * ls(0.5)) / 0.6]))

    lw, ll = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 2.0])
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_lengths=lw, rejected_lengths=ll)
    # h_w/|y_w| - h_l/|y_l| = [0.5 + 1, 0 - 0.5]; 1/(2β) = 1.
    torch.testing.assert_close(ipo, torch.tensor([(1.5 - 1.0) ** 2, (-0.5 - 1.0) ** 2]))


def test_sigmoid_loss_decreases_with_margin():
    zero = torch.zeros(4)
    deltas = torch.tensor([-1.0, 0.0, 1.0, 3.0])
    losses, _, _ = dpo_loss(deltas, zero, zero, zero, beta=1.0)
    assert torch.all(losses[1:] < losses[:-1])


def test_errors_name_the_problem():
    z = torch.zeros(1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(z, z, z, z, beta=0.0)
    with pytest.raises(ValueError, match="ipo"):
        dpo_loss(z, z, z, z, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo_loss(z, z, z, z, beta=0.1, loss_type="nope")


def test_nll_and_metrics():
    torch.testing.assert_close(chosen_nll(torch.tensor([-4.0, -3.0]), torch.tensor([2.0, 3.0])),
                               torch.tensor([2.0, 1.0]))
    m = preference_metrics(torch.tensor([0.2, -0.1]), torch.tensor([0.1, 0.3]), torch.tensor([-1.0, -5.0]),
                           torch.tensor([-2.0, -4.0]))
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    assert m["rewards/margins"].item() == pytest.approx((0.1 - 0.4) / 2)
    assert m["ranking_accuracy"].item() == pytest.approx(0.5)
    tied = preference_metrics(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3))
    assert tied["rewards/accuracies"].item() == 0.0
