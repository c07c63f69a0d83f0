"""GKD's generalized JSD, worked by hand on a 2-token vocabulary.

Student logits (0, 0): p_s = (1/2, 1/2). Teacher logits (ln 3, 0): p_t = (3/4, 1/4).
- forward KL(t || s) = 3/4 ln(3/2) + 1/4 ln(1/2)             = 0.130812
- reverse KL(s || t) = 1/2 ln(2/3) + 1/2 ln 2                 = 0.143841
- beta = 1/2: M = (5/8, 3/8); KL(t || M) = 3/4 ln(6/5) + 1/4 ln(2/3) = 0.035375,
  KL(s || M) = 1/2 ln(4/5) + 1/2 ln(4/3) = 0.032269; JSD = (0.035375 + 0.032269) / 2 = 0.033822
"""

import math

import pytest
import torch

from alignctl.nn.distill_loss import chunked_jsd_sum, distill_loss, token_jsd

FORWARD = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
REVERSE = 0.5 * math.log(2 / 3) + 0.5 * math.log(2)
HALF = 0.5 * (0.75 * math.log(1.2) + 0.25 * math.log(2 / 3)) + 0.5 * (0.5 * math.log(0.8) + 0.5 * math.log(4 / 3))


def pair(scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(2, requires_grad=True), torch.tensor([scale * math.log(3), 0.0])


@pytest.mark.parametrize(("beta", "expected"), [(0.0, FORWARD), (1.0, REVERSE), (0.5, HALF)])
def test_hand_worked_divergences(beta, expected):
    student, teacher = pair()
    assert token_jsd(student, teacher, beta).item() == pytest.approx(expected, abs=1e-6)
    assert (FORWARD, REVERSE, HALF) == pytest.approx((0.130812, 0.143841, 0.033822), abs=1e-6)


def test_temperature_divides_both_logits():
    # Teacher (2 ln 3, 0) at temperature 2 is (ln 3, 0); the student's zeros stay zeros.
    student, teacher = pair(scale=2.0)
    assert token_jsd(student, teacher, 1.0, temperature=2.0).item() == pytest.approx(REVERSE, abs=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
def test_zero_when_student_equals_teacher(beta):
    logits = torch.randn(2, 5, 7)
    assert torch.equal(token_jsd(logits, logits.clone(), beta), torch.zeros(2, 5))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradient_moves_the_student_toward_the_teacher(beta):
    student, teacher = pair()
    token_jsd(student, teacher, beta).backward()
    # The teacher prefers token 0: descending the loss raises the student's logit 0 and lowers logit 1.
    assert student.grad[0] < 0 < student.grad[1]
    assert teacher.grad is None


def test_loss_sums_masked_tokens_over_the_step_items():
    student = torch.zeros(1, 3, 2, requires_grad=True)
    teacher = torch.tensor([[[math.log(3), 0.0], [math.log(3), 0.0], [0.0, 9.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third position is padding: its large divergence is ignored
    loss, metrics = distill_loss(student, teacher, mask, 1.0, 1.0, num_items=4)
    assert loss.item() == pytest.approx(2 * REVERSE / 4, abs=1e-6)
    # argmax: student ties resolve to token 0, the teacher's choice at the two kept positions.
    assert metrics["distill/teacher_agreement"].item() == pytest.approx(2 / 4)
    loss.backward()
    assert student.grad[0, 2].abs().sum() == 0


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_chunked_positions_equal_the_full_logits(beta):
    torch.manual_seed(0)
    hidden, weight = torch.randn(7, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(7, 4), torch.randn(5, 4)
    full = token_jsd(hidden @ weight.T, teacher_hidden @ teacher_weight.T, beta, 2.0).sum()
    expected = torch.autograd.grad(full, (hidden, weight))
    total, agree = chunked_jsd_sum(hidden, weight, teacher_hidden, teacher_weight, beta, 2.0, chunk=3)  # chunks of 3, 3 and 1
    assert total.item() == pytest.approx(full.item(), rel=1e-6)
    for got, want in zip(torch.autograd.grad(total, (hidden, weight)), expected):
        assert torch.allclose(got, want, atol=1e-6)
    argmax_agree = ((hidden @ weight.T).argmax(-1) == (teacher_hidden @ teacher_weight.T).argmax(-1)).sum()
    assert agree.item() == argmax_agree.item()
