"""kto_loss against hand-worked values (Ethayarajh et al. 2024, eq. 8)."""

import math

import torch

from alignctl.nn.losses import kto_loss


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_policy_equal_to_reference_costs_half_the_weight():
    zeros = torch.zeros(4)
    desirable = torch.tensor([True, True, False, False])
    losses, out = kto_loss(zeros, zeros, desirable, torch.tensor(0.0), beta=0.1, desirable_weight=2.0, undesirable_weight=1.0)
    # 1 - sigma(0) = 0.5, times lambda_D = 2 or lambda_U = 1
    assert torch.allclose(losses, torch.tensor([1.0, 1.0, 0.5, 0.5]))
    assert torch.equal(out["rewards"], zeros)


def test_hand_worked_with_a_kl_reference_point():
    policy = torch.tensor([-1.0, -3.0])
    reference = torch.tensor([-2.0, -2.0])  # log-ratios r = +1 (desirable) and -1 (undesirable)
    desirable = torch.tensor([True, False])
    kl = torch.tensor(0.5)
    losses, out = kto_loss(policy, reference, desirable, kl, beta=2.0)
    # desirable: 1 - sigma(2 (1 - 0.5)) = 1 - sigma(1); undesirable: 1 - sigma(2 (0.5 - (-1))) = 1 - sigma(3)
    assert math.isclose(losses[0].item(), 1 - sig(1.0), rel_tol=1e-6)
    assert math.isclose(losses[1].item(), 1 - sig(3.0), rel_tol=1e-6)
    assert torch.allclose(out["rewards"], torch.tensor([2.0, -2.0]))


def test_negative_kl_estimates_are_clamped_to_zero():
    policy, reference = torch.tensor([-1.0]), torch.tensor([-1.5])
    desirable = torch.tensor([True])
    clamped, out = kto_loss(policy, reference, desirable, torch.tensor(-3.0), beta=1.0)
    at_zero, _ = kto_loss(policy, reference, desirable, torch.tensor(0.0), beta=1.0)
    assert torch.equal(clamped, at_zero)
    assert out["kl"].item() == 0.0  # what the stage logs as `kl`: the reference point used, not the raw -3


def test_the_reference_point_used_is_returned_for_logging():
    _, out = kto_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), torch.tensor([True]), torch.tensor(0.25), beta=1.0)
    assert out["kl"].item() == 0.25


def test_gradients_push_desirable_up_and_undesirable_down_but_not_through_kl():
    policy = torch.tensor([-2.0, -2.0], requires_grad=True)
    kl = torch.tensor(0.3, requires_grad=True)
    losses, _ = kto_loss(policy, torch.tensor([-2.0, -2.0]), torch.tensor([True, False]), kl, beta=0.5)
    losses.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # descending the loss raises the desirable log-prob, lowers the other
    assert kl.grad is None
