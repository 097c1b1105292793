"""On-policy distillation's parts without Ray: the reverse-KL advantages against hand values and the
loop form, the batch the stage builds (every token's advantage where the trainer reads it, the task
reward mixed in), a gradient step that lowers the sampled reverse KL, and the checks a distill stage's
config and teacher get before any actor starts."""

import shutil
from pathlib import Path

import pytest
import torch

from actors.modeling import load_causal_lm
from orchestrator.config import load_pipeline
from orchestrator.runtime.weight_sync import _probe_batch, _response_rows, probe_token_logps
from pipelines.algorithms.distill import reverse_kl_advantages, sequence_reverse_kl
from pipelines.errors import ConfigError
from pipelines.losses import PolicyGradientLoss
from pipelines.stages.distill import check_same_tokenizer, distill_batch
from tests.unit.test_ppo_losses import SEQUENCES, _scored

SHIPPED = Path(__file__).resolve().parents[2] / "pipelines" / "distill.yaml"


def test_reverse_kl_advantages_hand_values():
    student = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    teacher = torch.tensor([[-1.5, -1.0, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    d, adv = reverse_kl_advantages(student, teacher, mask, discount=0.0)
    assert d.tolist() == [[0.5, -1.0, 0.0, 0.0]]  # log π_θ − log π_T, zero off the mask
    assert adv.tolist() == [[-0.5, 1.0, -0.0, -0.0]]
    _, to_go = reverse_kl_advantages(student, teacher, mask, discount=1.0)
    assert to_go.tolist() == [[0.5, 1.0, -0.0, -0.0]]  # −(0.5 − 1 + 0), −(−1 + 0), −0
    _, half = reverse_kl_advantages(student, teacher, mask, discount=0.5)
    assert half[0, :3].tolist() == pytest.approx([-(0.5 + 0.5 * -1.0), 1.0, 0.0])
    assert sequence_reverse_kl(d).tolist() == [-0.5]
    with pytest.raises(ValueError, match="discount"):
        reverse_kl_advantages(student, teacher, mask, discount=1.5)


def test_reverse_kl_to_go_matches_the_loop_form():
    """Vectorised over rows, masked gaps (environment tokens) pass the sum through undiscounted."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    mask = (torch.rand(5, 9, generator=g) > 0.3).long()
    for gamma in (0.0, 0.7, 1.0):
        _, adv = reverse_kl_advantages(student, teacher, mask, discount=gamma)
        for b in range(5):
            tokens = [t for t in range(9) if mask[b, t]]
            for i, t in enumerate(tokens):
                want = -sum(gamma ** (j - i) * float(student[b, s] - teacher[b, s]) for j, s in enumerate(tokens)
                            if j >= i)
                assert float(adv[b, t]) == pytest.approx(want, abs=1e-5), (gamma, b, t)
            assert all(float(adv[b, t]) == 0.0 for t in range(9) if not mask[b, t])


def _model_logps(model_dir):
    model = load_causal_lm(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model, _response_rows(SEQUENCES, probe_token_logps(model, _probe_batch(SEQUENCES, 0)))


def test_distill_batch_places_each_tokens_kl_where_the_trainer_reads_it(tiny_model_dir):
    cfg = load_pipeline(SHIPPED).stage("distill")
    assert cfg.old_logprobs_in_update() and cfg.reference_free
    _, student = _model_logps(tiny_model_dir)
    scored = _scored(student)
    # the teacher less sure of every token by an amount that grows along the batch: d_t = offset
    offsets = [[0.1 * (i + 1) + 0.01 * t for t in range(len(row))] for i, row in enumerate(student)]
    scored.forwards["teacher_logprobs"] = [[x - o for x, o in zip(row, off, strict=True)]
                                           for row, off in zip(student, offsets, strict=True)]
    raw = load_pipeline(SHIPPED, ["stages.distill.distill.baseline=none",
                                  "stages.distill.distill.whiten=false"]).stage("distill")
    batch, metrics = distill_batch(raw, scored, student, pad_id=0)
    mask = batch.action_mask.bool()
    assert batch.old_logps is None and batch.behaviour_logps is not None  # π_old taken in the update
    want = torch.tensor([-o for off in offsets for o in off])
    assert torch.allclose(batch.advantages[mask], want, atol=1e-6)  # row by row, token by token: −d_t
    assert float(batch.advantages[~mask].abs().sum()) == 0.0
    assert metrics["distill/reverse_kl"] == pytest.approx(sum(map(sum, offsets)) / len(offsets), abs=1e-5)
    assert metrics["distill/reverse_kl_per_token"] == pytest.approx(float(-want.mean()), abs=1e-6)
    # the shipped defaults: a batch-mean baseline and whitening (the same order of tokens, mean 0, std 1)
    shipped, _ = distill_batch(cfg, scored, student, pad_id=0)
    adv = shipped.advantages[mask]
    assert float(adv.mean()) == pytest.approx(0.0, abs=1e-6) and float(adv.std(unbiased=False)) == pytest.approx(1.0)
    assert torch.equal(adv.argsort(), want.argsort())
    # the task reward mixed in: GRPO's group-normalised score on every token, weighted
    mixed = load_pipeline(SHIPPED, ["stages.distill.distill.reward_weight=0.5",
                                    "stages.distill.sampling.samples_per_prompt=2",
                                    "stages.distill.schedule.samples_per_microbatch=64"]).stage("distill")
    batch2, _ = distill_batch(mixed, scored, student, pad_id=0)
    extra = (batch2.advantages - shipped.advantages)[mask]
    lengths = [len(r) for _, r in SEQUENCES]
    # rewards [1, 0 | 1, 1]: the first group's samples get ±0.5·(1/std), the tied group 0
    first = extra[: lengths[0]]
    assert torch.allclose(first, first[0].expand_as(first)) and float(first[0]) > 0.3
    assert float(extra[lengths[0] + lengths[1]:].abs().max()) < 1e-6


def _next_token_dist(model, prompt):
    return torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)


def test_the_loss_on_these_advantages_descends_the_exact_reverse_kl(tiny_model_dir):
    """The sign and the estimator are right: every vocabulary token as a one-token response, weighted
    by its probability under the student (``is_weights``: the expectation over the student's samples
    written out), turns the clipped surrogate on the advantages −(log π_θ − log π_T) into the exact
    reverse KL's gradient; a small step lowers the exact KL(π_θ ‖ π_T) of the next token."""
    from pipelines.data.batches import PPOBatch

    prompt = [1, 5, 6, 7]
    student_model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32)
    torch.manual_seed(1)
    teacher_model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in teacher_model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        student, teacher = _next_token_dist(student_model, prompt), _next_token_dist(teacher_model, prompt)

    def exact_kl() -> float:
        with torch.no_grad():
            lp = _next_token_dist(student_model, prompt)
            return float((lp.exp() * (lp - teacher)).sum())

    vocab = student.shape[0]
    ids = torch.tensor([prompt + [v] for v in range(vocab)])
    col = len(prompt) - 1  # the next-token column that scores the response token

    def column(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(vocab, len(prompt))
        out[:, col] = values
        return out

    mask = column(torch.ones(vocab))
    _, adv = reverse_kl_advantages(student[:, None], teacher[:, None], torch.ones(vocab, 1), discount=0.0)
    batch = PPOBatch(ids, torch.ones_like(ids), mask, column(student), column(adv[:, 0]),
                     is_weights=column(student.exp()))
    before = exact_kl()
    loss, _ = PolicyGradientLoss(0.2)(student_model, batch)
    loss.backward()
    with torch.no_grad():
        for p in student_model.parameters():
            if p.grad is not None:
                p.sub_(2.0 * p.grad)
    after = exact_kl()
    assert before > 0.05 and after < before * 0.98, (before, after)


def test_distill_config_is_checked_when_the_yaml_loads():
    def bad(*overrides):
        with pytest.raises(ConfigError) as err:
            load_pipeline(SHIPPED, list(overrides))
        return str(err.value)

    assert "reference" in bad("stages.distill.reference=/somewhere")
    assert "needs reward" in bad("stages.distill.reward=null", "stages.distill.distill.reward_weight=1")
    assert "nothing to learn" in bad("stages.distill.distill.kl_weight=0")
    assert "discount" in bad("stages.distill.distill.discount=2")
    assert "teacher" in bad("stages.distill.teacher=null")
    plain = load_pipeline(SHIPPED, ["stages.distill.reward=null"]).stage("distill")  # the teacher alone
    assert "reward" not in plain.role_configs() and "teacher" in plain.role_configs()
    assert sum(r.cpus_per_worker for r in plain.role_configs().values()) <= 2.0


def test_the_teacher_must_share_the_students_tokenizer(tiny_model_dir, tmp_path):
    check_same_tokenizer(str(tiny_model_dir), str(tiny_model_dir))
    from pipelines.tasks.tiny_model import build_tiny_model

    other = build_tiny_model(tmp_path / "bpe", size="tiny", seed=0, tokenizer="bpe")
    with pytest.raises(ConfigError, match="another tokenizer"):
        check_same_tokenizer(str(tiny_model_dir), str(other))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    check_same_tokenizer(str(tiny_model_dir), str(copy))
