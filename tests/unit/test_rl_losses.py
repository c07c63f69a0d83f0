"""alignctl.nn.losses, online RL part: KL estimators, group advantages, the clipped surrogate, loss
aggregation, whitening, GAE, the clipped value loss and PPO's per-token rewards, on hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from alignctl.nn.losses import (
    aggregate,
    clipped_surrogate,
    clipped_value_loss,
    gae,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_whiten,
    score_to_token_rewards,
)

LN2 = math.log(2)


def _t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ----------------------------------------------------------------------------------- kl_penalty
@pytest.mark.parametrize(
    "d, k1, k2, k3",
    [
        (LN2, -LN2, 0.5 * LN2**2, 2 - LN2 - 1),  # pi_ref = 2 pi at the token
        (-LN2, LN2, 0.5 * LN2**2, 0.5 + LN2 - 1),  # pi_ref = pi / 2
    ],
)
def test_kl_estimators_by_hand(d, k1, k2, k3):
    # d = log pi_ref - log pi
    logps = _t([-1.0])
    ref_logps = logps + d
    assert kl_penalty(logps, ref_logps, "k1").item() == pytest.approx(k1, rel=1e-12)
    assert kl_penalty(logps, ref_logps, "k2").item() == pytest.approx(k2, rel=1e-12)
    assert kl_penalty(logps, ref_logps, "k3").item() == pytest.approx(k3, rel=1e-12)


def test_k3_is_the_default_and_never_negative():
    generator = torch.Generator().manual_seed(0)
    logps = torch.randn(4, 16, generator=generator, dtype=torch.float64) * 3
    ref_logps = torch.randn(4, 16, generator=generator, dtype=torch.float64) * 3
    k3 = kl_penalty(logps, ref_logps)
    torch.testing.assert_close(k3, kl_penalty(logps, ref_logps, "k3"))
    assert (k3 >= 0).all()
    assert (kl_penalty(logps, ref_logps, "k1") < 0).any()  # k1 alone can go negative on a sample


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_is_zero_when_the_log_probs_agree(estimator):
    logps = _t([-0.3, -2.0], [-5.0, -0.01])
    assert kl_penalty(logps, logps.clone(), estimator).abs().max().item() == 0.0


def test_unknown_kl_estimator_is_an_error():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(_t([0.0]), _t([0.0]), "k4")


# ---------------------------------------------------------------------------- group_advantages
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two groups of K = 4


def test_grpo_advantages_divide_by_the_unbiased_group_std():
    # group 1: mean 1/2, deviations +-1/2, unbiased var (4 x 1/4) / 3 = 1/3; group 2: all equal
    std = math.sqrt(1 / 3)
    a = 0.5 / (std + 1e-4)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, 4, "grpo"), expected)
    torch.testing.assert_close(group_advantages(REWARDS, 4), expected)  # grpo is the default


def test_grpo_eps_is_added_to_the_std():
    torch.testing.assert_close(
        group_advantages(REWARDS, 4, "grpo", eps=0.5)[:2],
        torch.tensor([0.5, -0.5]) / (math.sqrt(1 / 3) + 0.5),
    )


def test_dr_grpo_advantages_do_not_divide():
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, 4, "dr_grpo"), expected)


def test_rloo_subtracts_the_mean_of_the_other_completions():
    # r = 1: others (0 + 0 + 1) / 3 -> 2/3; r = 0: others 2/3 -> -2/3; i.e. K/(K-1) (r - mean)
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, 4, "rloo"), expected)
    rewards = torch.tensor([3.0, -1.0, 0.5, 2.0, 7.0, 1.0])
    groups = rewards.view(-1, 3)
    torch.testing.assert_close(
        group_advantages(rewards, 3, "rloo"), (3 / 2 * (groups - groups.mean(-1, keepdim=True))).view(-1)
    )


def test_reinforce_uses_the_batch_mean():
    # batch mean 6/8 = 0.75, across both groups
    expected = torch.tensor([0.25, -0.75, -0.75, 0.25, 0.25, 0.25, 0.25, 0.25])
    torch.testing.assert_close(group_advantages(REWARDS, 4, "reinforce"), expected)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce"])
def test_advantages_carry_no_gradient(estimator):
    rewards = REWARDS.clone().requires_grad_(True)
    assert not group_advantages(rewards, 4, estimator).requires_grad


def test_group_size_must_divide_the_rewards():
    with pytest.raises(ValueError, match="7 rewards"):
        group_advantages(REWARDS[:7], 4, "grpo")


def test_unknown_advantage_estimator_is_an_error():
    with pytest.raises(ValueError, match="ppo"):
        group_advantages(REWARDS, 4, "ppo")


# --------------------------------------------------------------------------- clipped_surrogate
def _surrogate(ratio: float, advantage: float, epsilon: float = 0.2, epsilon_high: float | None = None):
    """Loss, clip flag and d loss / d logp for one token with the given ratio (old log-prob 0)."""
    logps = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    loss, clipped = clipped_surrogate(
        logps,
        torch.zeros(1, 1, dtype=torch.float64),
        torch.tensor([[advantage]], dtype=torch.float64),
        epsilon,
        epsilon_high,
    )
    loss.sum().backward()
    return loss.item(), bool(clipped.item()), logps.grad.item()


def test_ratio_one_gives_minus_the_advantage():
    logps = _t([-1.0, -2.0], [-0.5, -3.0])
    advantages = _t([1.5, -2.0], [0.0, 4.0])
    loss, clipped = clipped_surrogate(logps, logps.clone(), advantages, 0.2)
    torch.testing.assert_close(loss, -advantages)
    assert not clipped.any()


def test_positive_advantage_is_clipped_above_one_plus_epsilon():
    loss, clipped, grad = _surrogate(1.5, 2.0)
    assert loss == pytest.approx(-(1 + 0.2) * 2.0)
    assert clipped and grad == 0.0
    # below 1 - eps a positive advantage is not clipped: the loss follows the ratio
    loss, clipped, grad = _surrogate(0.5, 2.0)
    assert loss == pytest.approx(-0.5 * 2.0)
    assert not clipped and grad == pytest.approx(-0.5 * 2.0)  # d(-rho A)/d logp = -rho A


def test_negative_advantage_is_clipped_below_one_minus_epsilon():
    loss, clipped, grad = _surrogate(0.5, -2.0)
    assert loss == pytest.approx(-(1 - 0.2) * -2.0)
    assert clipped and grad == 0.0
    # above 1 + eps a negative advantage is not clipped (the pessimistic bound)
    loss, clipped, grad = _surrogate(1.5, -2.0)
    assert loss == pytest.approx(1.5 * 2.0)
    assert not clipped and grad == pytest.approx(1.5 * 2.0)


def test_epsilon_high_moves_only_the_upper_bound():
    # ratio 1.3: clipped at 1.2 with eps = 0.2, inside the range with eps_high = 0.5
    assert _surrogate(1.3, 2.0)[:2] == (pytest.approx(-1.2 * 2.0), True)
    loss, clipped, grad = _surrogate(1.3, 2.0, epsilon_high=0.5)
    assert (loss, clipped, grad) == (pytest.approx(-1.3 * 2.0), False, pytest.approx(-1.3 * 2.0))
    assert _surrogate(1.8, 2.0, epsilon_high=0.5)[:2] == (pytest.approx(-1.5 * 2.0), True)
    # the lower bound is still 1 - eps
    assert _surrogate(0.5, -2.0, epsilon_high=0.5)[:2] == (pytest.approx(0.8 * 2.0), True)
    assert _surrogate(0.85, -2.0, epsilon_high=0.5)[:2] == (pytest.approx(0.85 * 2.0), False)


def test_one_advantage_per_sequence_broadcasts_over_its_tokens():
    generator = torch.Generator().manual_seed(1)
    logps = torch.randn(2, 3, generator=generator, dtype=torch.float64) * 0.05  # ratios within 1 +- 0.2
    old = torch.zeros(2, 3, dtype=torch.float64)
    advantages = _t(1.5, -2.0)
    loss, clipped = clipped_surrogate(logps, old, advantages, 0.2)
    assert loss.shape == (2, 3)
    torch.testing.assert_close(loss, -logps.exp() * advantages.unsqueeze(-1))
    torch.testing.assert_close(
        loss, clipped_surrogate(logps, old, advantages.unsqueeze(-1).expand(2, 3), 0.2)[0]
    )
    assert not clipped.any()


# ---------------------------------------------------------------------------------- aggregate
# rows of 3, 2, 4 and 1 completion tokens, left- and right-padded; masked-out entries hold junk
PER_TOKEN = _t(
    [1.0, 2.0, 3.0, 100.0], [100.0, 100.0, 4.0, 8.0], [5.0, 6.0, 7.0, 2.0], [9.0, 100.0, 100.0, 100.0]
)
MASK = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])


def test_token_aggregation_weighs_every_token_the_same():
    # (1 + 2 + 3) + (4 + 8) + (5 + 6 + 7 + 2) + 9 = 47 over 10 tokens
    assert aggregate(PER_TOKEN, MASK, "token", 10).item() == pytest.approx(4.7)


def test_sequence_aggregation_averages_each_completion_first():
    # row means 2, 6, 5, 9 -> 22 / 4
    assert aggregate(PER_TOKEN, MASK, "sequence", 4).item() == pytest.approx(5.5)


@pytest.mark.parametrize("level, total", [("token", 10), ("sequence", 4)])
def test_micro_batch_shares_sum_to_the_full_batch_value(level, total):
    full = aggregate(PER_TOKEN, MASK, level, total)
    # micro-batches of rows {0, 3} and {1, 2} (different token counts), num_items = the step total
    first = aggregate(PER_TOKEN[[0, 3]], MASK[[0, 3]], level, total)
    second = aggregate(PER_TOKEN[[1, 2]], MASK[[1, 2]], level, total)
    torch.testing.assert_close(first + second, full)


def test_a_completion_without_tokens_adds_nothing_to_the_sequence_mean():
    mask = MASK.clone()
    mask[3] = 0
    assert aggregate(PER_TOKEN, mask, "sequence", 3).item() == pytest.approx((2 + 6 + 5) / 3)


def test_unknown_aggregation_is_an_error():
    with pytest.raises(ValueError, match="batch"):
        aggregate(PER_TOKEN, MASK, "batch", 4)


# -------------------------------------------------------------------- masked_mean / masked_whiten
def test_masked_mean_by_hand_and_on_an_empty_mask():
    assert masked_mean(PER_TOKEN, MASK).item() == pytest.approx(4.7)
    assert masked_mean(PER_TOKEN, torch.zeros_like(MASK)).item() == 0.0


def test_masked_whiten_by_hand():
    # values 1 and 3 on the mask: mean 2, (population) variance 1
    whitened = masked_whiten(_t([1.0, 50.0, 3.0]), torch.tensor([[1, 0, 1]]))
    assert whitened[0, 0].item() == pytest.approx(-1.0, abs=1e-6)
    assert whitened[0, 2].item() == pytest.approx(1.0, abs=1e-6)


def test_masked_whiten_gives_zero_mean_unit_variance_on_the_mask_and_ignores_masked_out_values():
    generator = torch.Generator().manual_seed(2)
    values = torch.randn(3, 6, generator=generator, dtype=torch.float64) * 4 + 7
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    whitened = masked_whiten(values, mask)
    on = whitened[mask.bool()]
    assert on.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert on.var(unbiased=False).item() == pytest.approx(1.0, rel=1e-6)
    junk = values.masked_fill(~mask.bool(), 1e4)
    torch.testing.assert_close(masked_whiten(junk, mask)[mask.bool()], on)


def test_masked_whiten_can_keep_the_mean():
    values = _t([1.0, 50.0, 3.0])
    mask = torch.tensor([[1, 0, 1]])
    kept = masked_whiten(values, mask, shift_mean=False)
    assert kept[0, 0].item() == pytest.approx(1.0, abs=1e-6)  # -1 + mean 2
    assert kept[0, 2].item() == pytest.approx(3.0, abs=1e-6)  # 1 + mean 2


# ---------------------------------------------------------------------------------------- gae
def _naive_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """One unpadded episode; V after its last token is 0."""
    deltas = [
        r + gamma * (values[t + 1] if t + 1 < len(values) else 0.0) - values[t] for t, r in enumerate(rewards)
    ]
    out, running = [], 0.0
    for delta in reversed(deltas):
        running = delta + gamma * lam * running
        out.append(running)
    return out[::-1]


def test_gae_with_gamma_lam_one_is_the_reward_to_go_minus_the_value():
    rewards, values = _t([1.0, 2.0, 3.0]), _t([0.5, 1.0, 1.5])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    # reward to go: 6, 5, 3
    torch.testing.assert_close(advantages, _t([5.5, 4.0, 1.5]))
    torch.testing.assert_close(returns, _t([6.0, 5.0, 3.0]))


def test_gae_with_lam_zero_is_the_one_step_td_error():
    rewards, values = _t([1.0, 2.0, 3.0]), _t([0.5, 1.0, 1.5])
    advantages, _ = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.0)
    # r_t + V_{t+1} - V_t, V after the last token 0
    torch.testing.assert_close(advantages, _t([1.5, 2.5, 1.5]))
    advantages, _ = gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=0.0)
    torch.testing.assert_close(advantages, _t([1.0, 1.75, 1.5]))


def test_gae_is_the_same_for_left_and_right_padded_rows():
    r, v = [1.0, -2.0, 0.5], [0.3, 0.7, -0.4]
    expected = _naive_gae(r, v, gamma=0.9, lam=0.8)
    junk = 9.0  # masked-out positions may hold anything
    rewards = _t([junk, junk, *r], [*r, junk, junk], [junk, *r, junk])
    values = _t([junk, junk, *v], [*v, junk, junk], [junk, *v, junk])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages[0, 2:], _t(*expected))
    torch.testing.assert_close(advantages[1, :3], _t(*expected))
    torch.testing.assert_close(advantages[2, 1:4], _t(*expected))
    torch.testing.assert_close(returns[mask.bool()], (advantages + values)[mask.bool()])
    assert advantages[~mask.bool()].abs().max().item() == 0.0
    assert returns[~mask.bool()].abs().max().item() == 0.0


@pytest.mark.parametrize("mask", [[0, 0, 1, 1], [1, 1, 0, 0]], ids=["left", "right"])
def test_gae_value_after_the_last_token_is_zero(mask):
    # two tokens, rewards 0 and 1, V = 5; padding holds reward 3 and value 9; gamma = lam = 1
    on = torch.tensor([mask]).bool()
    rewards = torch.full((1, 4), 3.0, dtype=torch.float64).masked_scatter(on, _t([0.0, 1.0]))
    values = torch.full((1, 4), 9.0, dtype=torch.float64).masked_fill(on, 5.0)
    advantages, returns = gae(rewards, values, torch.tensor([mask]), gamma=1.0, lam=1.0)
    # A = reward to go - V: (1 - 5, 1 - 5); returns = reward to go
    torch.testing.assert_close(advantages[on], _t(-4.0, -4.0))
    torch.testing.assert_close(returns[on], _t(1.0, 1.0))


def test_gae_returns_carry_no_gradient():
    values = _t([0.5, 1.0]).requires_grad_(True)
    advantages, returns = gae(_t([1.0, 1.0]), values, torch.ones(1, 2), 1.0, 0.95)
    assert not advantages.requires_grad and not returns.requires_grad


# -------------------------------------------------------------------------- clipped_value_loss
def test_clipped_value_loss_by_hand():
    values = _t([2.0, 0.0, 1.2]).requires_grad_(True)
    old = _t([1.0, 1.0, 1.0])
    returns = _t([0.0, 0.0, 3.0])
    loss, clipped = clipped_value_loss(values, old, returns, clip_range=0.5)
    # 1) V = 2 clips to 1.5: errors 4 (plain) and 2.25 -> max 4, plain
    # 2) V = 0 clips to 0.5: errors 0 and 0.25 -> the clipped one
    # 3) V = 1.2 inside the range: both 1.8^2
    torch.testing.assert_close(loss, _t([2.0, 0.125, 0.5 * 1.8**2]))
    assert clipped.tolist() == [[False, True, False]]
    loss.sum().backward()
    # gradient V - R on the plain branch, none where the clipped value was taken
    torch.testing.assert_close(values.grad, _t([2.0, 0.0, -1.8]))


# ---------------------------------------------------------------------- score_to_token_rewards
def test_score_lands_on_the_last_completion_token_of_each_row():
    scores = torch.tensor([5.0, 7.0, 3.0, 1.0])
    kl = torch.tensor(
        [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]]
    )
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    rewards = score_to_token_rewards(scores, kl, mask, kl_coef=0.5)
    expected = torch.tensor(
        [
            [0.0, 0.0, -0.15, -0.2 + 5.0],  # left-padded
            [-0.25, -0.3 + 7.0, 0.0, 0.0],  # right-padded
            [-0.5, -0.5, -0.5, -0.5 + 3.0],  # no padding
            [-1.0 + 1.0, 0.0, 0.0, 0.0],  # one token at position 0
        ]
    )
    torch.testing.assert_close(rewards, expected)


def test_token_rewards_carry_no_gradient():
    kl = torch.tensor([[0.1, 0.2]], requires_grad=True)
    scores = torch.tensor([1.0], requires_grad=True)
    assert not score_to_token_rewards(scores, kl, torch.ones(1, 2), 0.1).requires_grad
