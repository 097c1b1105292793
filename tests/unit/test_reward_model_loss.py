"""Bradley–Terry loss and reward centring pinned against closed forms."""

import math

import torch

from pipelines.algorithms.reward_model import bradley_terry_loss, reward_centering_penalty


def test_equal_rewards_give_log2():
    r = torch.tensor([0.0, 1.5, -2.0])
    torch.testing.assert_close(bradley_terry_loss(r, r.clone()), torch.full((3,), math.log(2)))


def test_margin_at_equal_rewards():
    r = torch.tensor([0.3, 0.3])
    m = torch.tensor([1.0, 2.5])
    expected = torch.tensor([-math.log(1 / (1 + math.exp(1.0))), -math.log(1 / (1 + math.exp(2.5)))])
    torch.testing.assert_close(bradley_terry_loss(r, r.clone(), m), expected)


def test_hand_computed_and_gradient():
    rw = torch.tensor([2.0, -1.0], requires_grad=True)
    rl = torch.tensor([1.0, 1.0])
    loss = bradley_terry_loss(rw, rl)
    torch.testing.assert_close(loss.detach(), torch.tensor([math.log1p(math.exp(-1.0)), math.log1p(math.exp(2.0))]))
    loss.sum().backward()
    # d/d r_w of −log σ(d) = −σ(−d)
    torch.testing.assert_close(rw.grad, -torch.sigmoid(-torch.tensor([1.0, -2.0])))


def test_centering_penalty():
    torch.testing.assert_close(reward_centering_penalty(torch.tensor([1.0, -2.0]), torch.tensor([1.0, 2.0])),
                               torch.tensor([4.0, 0.0]))
