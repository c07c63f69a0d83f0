"""The DPO family and the Bradley-Terry reward loss (alignctl.nn.losses) against values worked by hand.

Notation: h = (log pi(y+) - log pi_ref(y+)) - (log pi(y-) - log pi_ref(y-)) is the implicit reward
margin, x = beta * h, and the identity -log sigma(-x) = -log sigma(x) + x is used throughout.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignctl.nn.losses import dpo_loss, reward_model_loss

LN2 = math.log(2)
LOSS_TYPES = ["sigmoid", "robust", "hinge", "ipo", "simpo"]


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def softplus(x: float) -> float:
    """-log sigma(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


# Two pairs whose policy equals the reference: h = 0 for both.
SAME = dict(
    policy_chosen_logps=t(-3.0, -1.0),
    policy_rejected_logps=t(-4.0, -2.5),
    ref_chosen_logps=t(-3.0, -1.0),
    ref_rejected_logps=t(-4.0, -2.5),
)

# One pair: chosen ratio (-1) - (-2) = 1, rejected ratio (-3) - (-2) = -1, so h = 2; beta = 0.5 gives x = 1.
WORKED = dict(policy_chosen_logps=t(-1.0), policy_rejected_logps=t(-3.0), ref_chosen_logps=t(-2.0), ref_rejected_logps=t(-2.0))
A = softplus(-1.0)  # -log sigma(1) = log(1 + e^-1) = 0.3132617


# ------------------------------------------------------------------------- policy == reference
@pytest.mark.parametrize(
    ("loss_type", "beta", "label_smoothing", "expected"),
    [
        ("sigmoid", 0.1, 0.0, LN2),  # -log sigma(0) = log 2
        ("sigmoid", 0.1, 0.3, LN2),  # -(0.7) log 1/2 - 0.3 log 1/2 = log 2
        ("robust", 0.1, 0.0, LN2),  # eps = 0: plain sigmoid
        ("robust", 0.1, 0.2, LN2),  # (0.8 log 2 - 0.2 log 2) / 0.6 = log 2
        ("hinge", 0.1, 0.0, 1.0),  # max(0, 1 - 0) = 1
        ("ipo", 0.1, 0.0, 25.0),  # (0 - 1/(2 * 0.1))^2 = 5^2 = 1/(4 beta^2)
        ("ipo", 0.5, 0.0, 1.0),  # (0 - 1)^2 = 1/(4 * 0.25)
    ],
)
def test_policy_equal_to_reference(loss_type, beta, label_smoothing, expected):
    losses, rewards = dpo_loss(**SAME, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    assert losses.shape == (2,)
    assert losses.tolist() == pytest.approx([expected, expected], rel=1e-12)
    assert rewards["chosen_rewards"].tolist() == [0.0, 0.0]
    assert rewards["rejected_rewards"].tolist() == [0.0, 0.0]


def test_ipo_at_policy_equal_to_reference_is_one_over_four_beta_squared():
    for beta in (0.05, 0.1, 0.25, 1.0, 3.0):
        losses, _ = dpo_loss(**SAME, beta=beta, loss_type="ipo")
        assert losses.tolist() == pytest.approx([1 / (4 * beta**2)] * 2, rel=1e-12)


# ---------------------------------------------------------------------------------- sigmoid
def test_sigmoid_hand_worked():
    # x = beta * h = 0.5 * 2 = 1: -log sigma(1) = log(1 + e^-1) = 0.3132617
    losses, rewards = dpo_loss(**WORKED, beta=0.5, loss_type="sigmoid")
    assert losses.item() == pytest.approx(0.31326168751822286, rel=1e-12)
    # rewards: beta * (policy - reference) = 0.5 * 1 and 0.5 * -1
    assert rewards["chosen_rewards"].item() == pytest.approx(0.5)
    assert rewards["rejected_rewards"].item() == pytest.approx(-0.5)


def test_zero_label_smoothing_is_plain_sigmoid_exactly():
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=gen, dtype=torch.float64) * 3 for _ in range(4))
    beta = 0.3
    losses, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid", label_smoothing=0.0)
    plain = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    assert torch.equal(losses, plain)


def test_conservative_dpo_matches_formula():
    # eps = 0.2, x = 1: 0.8 * log(1 + e^-1) + 0.2 * log(1 + e) = 0.8 A + 0.2 (A + 1) = A + 0.2 = 0.5132617
    losses, _ = dpo_loss(**WORKED, beta=0.5, loss_type="sigmoid", label_smoothing=0.2)
    assert losses.item() == pytest.approx(A + 0.2, rel=1e-12)
    assert losses.item() == pytest.approx(0.8 * softplus(-1.0) + 0.2 * softplus(1.0), rel=1e-12)


# ---------------------------------------------------------------------------------- robust
def test_robust_hand_worked():
    # eps = 0.2, x = 1: (0.8 log(1 + e^-1) - 0.2 log(1 + e)) / 0.6 = (0.8 A - 0.2 (A + 1)) / 0.6 = A - 1/3 = -0.0200716
    losses, _ = dpo_loss(**WORKED, beta=0.5, loss_type="robust", label_smoothing=0.2)
    assert losses.item() == pytest.approx(A - 1 / 3, rel=1e-10)


def test_robust_with_zero_eps_is_sigmoid():
    losses, _ = dpo_loss(**WORKED, beta=0.5, loss_type="robust", label_smoothing=0.0)
    assert losses.item() == pytest.approx(A, rel=1e-12)


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.2, 0.4])
def test_robust_is_unbiased_under_flipped_labels(eps):
    """If a label is flipped with probability eps, the expected robust loss is the clean DPO loss:
    (1 - eps) * robust(h) + eps * robust(-h) == -log sigma(beta h). (The conservative, smoothed loss
    is not: it is checked to differ, so the test tells the two apart.)"""
    beta = 0.7
    h = torch.linspace(-4, 4, 17, dtype=torch.float64)
    zeros = torch.zeros_like(h)
    robust_h, _ = dpo_loss(h, zeros, zeros, zeros, beta=beta, loss_type="robust", label_smoothing=eps)
    robust_flipped, _ = dpo_loss(zeros, h, zeros, zeros, beta=beta, loss_type="robust", label_smoothing=eps)  # margin -h
    clean = -F.logsigmoid(beta * h)
    torch.testing.assert_close((1 - eps) * robust_h + eps * robust_flipped, clean, rtol=0, atol=1e-12)

    smoothed_h, _ = dpo_loss(h, zeros, zeros, zeros, beta=beta, loss_type="sigmoid", label_smoothing=eps)
    smoothed_flipped, _ = dpo_loss(zeros, h, zeros, zeros, beta=beta, loss_type="sigmoid", label_smoothing=eps)
    assert not torch.allclose((1 - eps) * smoothed_h + eps * smoothed_flipped, clean)


# ---------------------------------------------------------------------------------- hinge
def test_hinge_hand_worked():
    # beta = 0.5: h = 2 -> max(0, 1 - 1) = 0; h = 1 -> 0.5; h = -2 -> 2; h = 4 -> 0 (no gradient either)
    pc = t(2.0, 1.0, -2.0, 4.0, grad=True)
    zeros = torch.zeros(4, dtype=torch.float64)
    losses, _ = dpo_loss(pc, zeros, zeros, zeros, beta=0.5, loss_type="hinge")
    assert losses.tolist() == pytest.approx([0.0, 0.5, 2.0, 0.0])
    losses.sum().backward()
    # d/dh max(0, 1 - beta h) = -beta where 1 - beta h > 0, else 0
    assert pc.grad.tolist() == pytest.approx([0.0, -0.5, -0.5, 0.0])


# ---------------------------------------------------------------------------------- ipo
def test_ipo_hand_worked():
    # beta = 0.5: target margin 1/(2 beta) = 1; h = 2 -> (2 - 1)^2 = 1; h = -1 -> 4
    pc = t(2.0, -1.0)
    zeros = torch.zeros(2, dtype=torch.float64)
    losses, _ = dpo_loss(pc, zeros, zeros, zeros, beta=0.5, loss_type="ipo")
    assert losses.tolist() == pytest.approx([1.0, 4.0])


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_is_minimised_at_margin_one_over_two_beta(beta):
    target = 1 / (2 * beta)
    pc = t(target - 0.5, target, target + 0.5, grad=True)
    pr = t(0.0, 0.0, 0.0, grad=True)
    zeros = torch.zeros(3, dtype=torch.float64)
    losses, _ = dpo_loss(pc, pr, zeros, zeros, beta=beta, loss_type="ipo")
    losses.sum().backward()
    # dL/dh = 2 (h - 1/(2 beta)): -1, 0, +1
    assert pc.grad.tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-12)
    assert pr.grad.tolist() == pytest.approx([1.0, 0.0, -1.0], abs=1e-12)
    assert losses[1].item() == pytest.approx(0.0, abs=1e-20)
    assert losses[1] < losses[0] and losses[1] < losses[2]


# ---------------------------------------------------------------------------------- simpo
def test_simpo_uses_gamma():
    zeros = torch.zeros(1, dtype=torch.float64)
    # zero margin: -log sigma(0 - gamma) = log(1 + e^gamma); gamma = 0.5 -> 0.9740770
    losses, _ = dpo_loss(t(-1.2), t(-1.2), zeros, zeros, beta=2.0, loss_type="simpo", simpo_gamma=0.5)
    assert losses.item() == pytest.approx(softplus(0.5), rel=1e-12)
    assert losses.item() == pytest.approx(0.9740769841801067, rel=1e-12)
    # margin 0.5, beta 2: -log sigma(2 * 0.5 - 0.5) = log(1 + e^-0.5) = 0.4740770
    losses, rewards = dpo_loss(t(-1.0), t(-1.5), zeros, zeros, beta=2.0, loss_type="simpo", simpo_gamma=0.5)
    assert losses.item() == pytest.approx(softplus(-0.5), rel=1e-12)
    # reference-free: the rewards are beta times the (length-normalised) policy log-probs
    assert rewards["chosen_rewards"].item() == pytest.approx(-2.0)
    assert rewards["rejected_rewards"].item() == pytest.approx(-3.0)


def test_simpo_without_gamma_is_reference_free_sigmoid():
    zeros = torch.zeros(1, dtype=torch.float64)
    simpo, _ = dpo_loss(WORKED["policy_chosen_logps"], WORKED["policy_rejected_logps"], zeros, zeros, beta=0.5,
                        loss_type="simpo", simpo_gamma=0.0)
    # h = -1 - (-3) = 2, x = 1: log(1 + e^-1)
    assert simpo.item() == pytest.approx(A, rel=1e-12)


# ------------------------------------------------------------------------------- shared
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_rewards_are_beta_times_log_ratio_and_detached(loss_type):
    pc, pr = t(-1.0, -7.5, grad=True), t(-2.0, -6.0, grad=True)
    rc, rr = t(-1.5, -7.0), t(-1.0, -8.0)
    beta = 0.3
    _, rewards = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    # chosen: 0.3 * (0.5, -0.5) = (0.15, -0.15); rejected: 0.3 * (-1, 2) = (-0.3, 0.6)
    assert rewards["chosen_rewards"].tolist() == pytest.approx([0.15, -0.15])
    assert rewards["rejected_rewards"].tolist() == pytest.approx([-0.3, 0.6])
    assert not rewards["chosen_rewards"].requires_grad and not rewards["rejected_rewards"].requires_grad


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo", "simpo"])
def test_raising_the_chosen_log_prob_lowers_the_loss(loss_type):
    """At h = 0 every member of the family wants a larger margin: d loss / d log pi(y+) < 0 and
    d loss / d log pi(y-) > 0 (for simpo with gamma > 0 as well)."""
    pc, pr = t(-2.0, grad=True), t(-2.0, grad=True)
    ref = t(-2.0)
    losses, _ = dpo_loss(pc, pr, ref, ref, beta=0.5, loss_type=loss_type,
                         label_smoothing=0.1 if loss_type == "robust" else 0.0, simpo_gamma=0.5)
    losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()
    assert pc.grad.item() == pytest.approx(-pr.grad.item())


def test_sigmoid_gradient_hand_worked():
    # d/d log pi(y+) of -log sigma(beta h) = -beta sigma(-beta h); at h = 0, beta = 0.5: -0.25
    pc, pr = t(-2.0, grad=True), t(-3.0, grad=True)
    losses, _ = dpo_loss(pc, pr, t(-2.0), t(-3.0), beta=0.5, loss_type="sigmoid")
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.25)
    assert pr.grad.item() == pytest.approx(0.25)
    # and a step along -grad lowers the loss
    with torch.no_grad():
        after, _ = dpo_loss(pc - 0.1 * pc.grad, pr - 0.1 * pr.grad, t(-2.0), t(-3.0), beta=0.5, loss_type="sigmoid")
    assert after.item() < LN2


def test_unknown_loss_type_is_rejected():
    with pytest.raises(ValueError, match="foo"):
        dpo_loss(**SAME, beta=0.1, loss_type="foo")


# ---------------------------------------------------------------------------- reward model
def test_reward_model_equal_scores_give_log_2():
    losses = reward_model_loss(t(0.0, 3.0, -1.5), t(0.0, 3.0, -1.5))
    assert losses.tolist() == pytest.approx([LN2] * 3, rel=1e-12)


def test_reward_model_hand_worked_and_margin_shifts_it():
    # gap 2 - 1 = 1: -log sigma(1) = A
    assert reward_model_loss(t(2.0), t(1.0)).item() == pytest.approx(A, rel=1e-12)
    # margin 1: -log sigma(1 - 1) = log 2; margin 2: -log sigma(-1) = A + 1
    assert reward_model_loss(t(2.0), t(1.0), margin=t(1.0)).item() == pytest.approx(LN2, rel=1e-12)
    assert reward_model_loss(t(2.0), t(1.0), margin=t(2.0)).item() == pytest.approx(A + 1, rel=1e-12)
    # a margin is per pair
    per_pair = reward_model_loss(t(2.0, 2.0), t(1.0, 1.0), margin=t(0.0, 1.0))
    assert per_pair.tolist() == pytest.approx([A, LN2], rel=1e-12)


def test_reward_model_centering_adds_c_times_squared_sum():
    # c = 0.01, r+ = 2, r- = 1: A + 0.01 * 3^2 = A + 0.09
    assert reward_model_loss(t(2.0), t(1.0), center_coefficient=0.01).item() == pytest.approx(A + 0.09, rel=1e-12)
    # centred rewards (r+ = -r-) pay nothing: gap 2 -> -log sigma(2)
    assert reward_model_loss(t(1.0), t(-1.0), center_coefficient=0.5).item() == pytest.approx(softplus(-2.0), rel=1e-12)


def test_reward_model_gradient_pushes_chosen_up_and_rejected_down():
    chosen, rejected = t(0.0, 1.0, grad=True), t(0.0, 3.0, grad=True)
    reward_model_loss(chosen, rejected).sum().backward()
    # dL/dr+ = -sigma(-gap): gap 0 -> -0.5; gap -2 -> -sigma(2) = -0.8807971
    assert chosen.grad.tolist() == pytest.approx([-0.5, -1 / (1 + math.exp(-2))])
    assert rejected.grad.tolist() == pytest.approx([0.5, 1 / (1 + math.exp(-2))])

    # with centering, c = 0.25 at r+ = r- = 1: dL/dr+ = -0.5 + 2 * 0.25 * 2 = 0.5, dL/dr- = 0.5 + 1 = 1.5
    chosen, rejected = t(1.0, grad=True), t(1.0, grad=True)
    reward_model_loss(chosen, rejected, center_coefficient=0.25).sum().backward()
    assert chosen.grad.item() == pytest.approx(0.5)
    assert rejected.grad.item() == pytest.approx(1.5)
