"""The GRPO family's losses and advantages (alignctl/nn/losses.py), on hand-worked values: GSPO's
sequence ratio, CISPO's capped and detached weights, REINFORCE++'s batch scale, DAPO's overlong
punishment, and the clipped tokens split by side."""

from __future__ import annotations

import math

import pytest
import torch

from alignctl.nn.losses import (
    aggregate,
    cispo_surrogate,
    clipped_surrogate,
    group_advantages,
    gspo_surrogate,
    overlong_penalty,
    policy_surrogate,
    token_surrogate,
)


def test_the_token_surrogate_is_ppo_s_and_names_the_clipped_side():
    logps = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)]], requires_grad=True)
    old = torch.zeros(1, 3)
    advantages = torch.tensor([[1.0, -1.0, 1.0]])
    out = token_surrogate(logps, old, advantages, 0.2)
    # 1.5 x (+1) is clipped to 1.2; 0.5 x (-1) is clipped to -0.8 (the min of -0.5 and -0.8); 1.1 is inside.
    assert out.loss[0].tolist() == pytest.approx([-1.2, 0.8, -1.1])
    assert out.clipped_high.tolist() == [[True, False, False]] and out.clipped_low.tolist() == [[False, True, False]]
    assert out.weight[0].tolist() == pytest.approx([1.5, 0.5, 1.1])
    reference, clipped = clipped_surrogate(logps, old, advantages, 0.2)
    assert torch.equal(out.loss, reference) and torch.equal(out.clipped_low | out.clipped_high, clipped)


def test_gspo_clips_one_ratio_per_completion():
    # Token log-ratios log 2 and 0: the completion's ratio is exp(log(2) / 2) = sqrt(2) = 1.41421.
    logps = torch.tensor([[math.log(2.0), 0.0, 5.0]])
    old = torch.zeros(1, 3)
    mask = torch.tensor([[1, 1, 0]])  # the third position is padding and must not count
    clipped = gspo_surrogate(logps, old, mask, torch.tensor([1.0]), 0.2)
    assert clipped.loss[0, :2].tolist() == pytest.approx([-1.2, -1.2])
    assert clipped.clipped_high[0, :2].tolist() == [True, True]
    inside = gspo_surrogate(logps, old, mask, torch.tensor([1.0]), 1.0)
    assert inside.loss[0, :2].tolist() == pytest.approx([-math.sqrt(2)] * 2) and not inside.clipped_high.any()


def test_gspo_token_form_has_the_sequence_objective_s_gradient():
    torch.manual_seed(0)
    old = torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    advantages = torch.tensor([0.7, -1.3])
    start = old + 0.05 * torch.randn(2, 4)  # near the sampling policy: no clipping with eps = 0.5
    logps = start.clone().requires_grad_(True)
    aggregate(gspo_surrogate(logps, old, mask, advantages, 0.5).loss, mask, "sequence", 2).backward()
    direct = start.clone().requires_grad_(True)
    ratio = torch.exp(((direct - old) * mask).sum(-1) / mask.sum(-1))  # s_i of eq. 5
    (-(ratio * advantages).mean()).backward()
    assert torch.allclose(logps.grad, direct.grad * mask, atol=1e-6)


def test_gspo_on_a_fresh_rollout_is_the_length_normalised_on_policy_gradient():
    logps = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    mask = torch.ones(1, 3)
    aggregate(gspo_surrogate(logps, logps.detach(), mask, torch.tensor([2.0]), 3e-4, 4e-4).loss, mask, "sequence", 1).backward()
    assert logps.grad[0].tolist() == pytest.approx([-2.0 / 3] * 3)  # -A x mean_t grad log pi


def test_cispo_caps_and_detaches_its_weights_and_keeps_every_token_s_gradient():
    logps = torch.tensor([[math.log(3.0), math.log(0.5)]], requires_grad=True)
    old = torch.zeros(1, 2)
    out = cispo_surrogate(logps, old, torch.tensor([1.0]), 0.2)
    assert out.weight[0].tolist() == pytest.approx([1.2, 0.5]) and not out.weight.requires_grad
    assert out.clipped_high.tolist() == [[True, False]] and not out.clipped_low.any()
    out.loss.sum().backward()
    assert logps.grad[0].tolist() == pytest.approx([-1.2, -0.5])  # -weight x A: the capped token still learns
    ppo = logps.detach().clone().requires_grad_(True)
    token_surrogate(ppo, old, torch.tensor([1.0]), 0.2).loss.sum().backward()
    assert ppo.grad[0, 0] == 0  # where PPO's clip drops the token


def test_cispo_on_a_fresh_rollout_is_reinforce():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    policy_surrogate("cispo", logps, logps.detach(), torch.ones(1, 2), torch.tensor([-0.5]), 0.2).loss.sum().backward()
    assert logps.grad[0].tolist() == pytest.approx([0.5, 0.5])


def test_reinforce_pp_centres_on_the_group_and_scales_by_the_batch():
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2, "reinforce_pp")
    # Centred: [0.5, -0.5, 0, 0]; the batch std (unbiased) is sqrt(0.5 / 3) = 0.408248.
    scale = math.sqrt(0.5 / 3) + 1e-4
    assert advantages.tolist() == pytest.approx([0.5 / scale, -0.5 / scale, 0.0, 0.0])
    # A group where every completion scored the same gets no advantage, as in GRPO.
    assert group_advantages(torch.tensor([3.0, 3.0, 1.0, 0.0]), 2, "reinforce_pp")[:2].tolist() == [0.0, 0.0]


def test_overlong_penalty_falls_from_zero_to_minus_one_over_the_buffer():
    lengths = torch.tensor([5, 6, 8, 10, 12])
    assert overlong_penalty(lengths, 10, 4).tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    assert overlong_penalty(lengths, 10, 0).tolist() == [0.0] * 5


def test_an_unknown_policy_loss_names_the_valid_ones():
    with pytest.raises(ValueError, match="ppo_clip, gspo, cispo"):
        policy_surrogate("vanilla", torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1), 0.2)
