"""Held-out metrics of the DPO-family stages use the configured loss (every ``dpo.loss_type``)."""


import pytest
import torch

from pipelines.algorithms.dpo import chosen_nll, dpo_loss
from pipelines.data.tokens import TokenizedPair
from pipelines.stages.config import DPOConfig
from pipelines.stages.pairs import PairSet, dpo_loss_of, held_out_metrics

pytestmark = pytest.mark.unit


def _held_out(n: int = 6) -> tuple[PairSet, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    pairs = [TokenizedPair([1, 2], [3] * (1 + i % 3), [4] * (2 + i % 2)) for i in range(n)]
    ref_c, ref_r = -5 * torch.rand(n, generator=gen), -5 * torch.rand(n, generator=gen)
    chosen, rejected = -5 * torch.rand(n, generator=gen), -5 * torch.rand(n, generator=gen)
    return PairSet(pairs, ref_c, ref_r), chosen, rejected


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_eval_loss_is_the_configured_loss(loss_type):
    held_out, chosen, rejected = _held_out()
    smoothing = {"sigmoid": 0.1, "robust": 0.3}.get(loss_type, 0.0)
    dpo = DPOConfig(beta=0.3, loss_type=loss_type, label_smoothing=smoothing)
    metrics, cr, rr = held_out_metrics(dpo_loss_of(dpo), held_out, chosen, rejected)

    lc = torch.tensor([float(len(p.chosen)) for p in held_out.pairs])
    lr = torch.tensor([float(len(p.rejected)) for p in held_out.pairs])
    want, want_cr, want_rr = dpo_loss(chosen, rejected, held_out.ref_chosen, held_out.ref_rejected, beta=0.3,
                                      loss_type=loss_type, label_smoothing=smoothing, chosen_lengths=lc,
                                      rejected_lengths=lr)
    assert metrics["eval/loss"] == pytest.approx(float(want.mean()), rel=1e-6)
    torch.testing.assert_close(cr, want_cr)
    torch.testing.assert_close(rr, want_rr)
    assert metrics["eval/rewards/accuracies"] == pytest.approx(float((want_cr > want_rr).float().mean()))
    if loss_type != "sigmoid":  # the bug this guards against: eval/loss was always the plain sigmoid loss
        plain, _, _ = dpo_loss(chosen, rejected, held_out.ref_chosen, held_out.ref_rejected, beta=0.3)
        assert metrics["eval/loss"] != pytest.approx(float(plain.mean()), rel=1e-3)


def test_eval_loss_includes_the_rpo_term():
    held_out, chosen, rejected = _held_out()
    metrics, _, _ = held_out_metrics(dpo_loss_of(DPOConfig(beta=0.1, rpo_alpha=0.5)), held_out, chosen, rejected)
    lc = torch.tensor([float(len(p.chosen)) for p in held_out.pairs])
    pref, _, _ = dpo_loss(chosen, rejected, held_out.ref_chosen, held_out.ref_rejected, beta=0.1)
    nll = chosen_nll(chosen, lc).mean()
    assert metrics["eval/loss/nll"] == pytest.approx(float(nll), rel=1e-6)
    assert metrics["eval/loss"] == pytest.approx(float(pref.mean() + 0.5 * nll), rel=1e-6)
