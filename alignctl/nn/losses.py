"""Loss functions: pure tensor maths, no model, no config, no device logic.

Each returns ``(loss, metrics)``. Losses that a step splits over micro-batches take ``num_items``,
the number of items (tokens or sequences) in the whole optimiser step, and return their share of the
step's mean: summed over micro-batches (and processes) they give exactly the full-batch mean.
Metrics are returned the same way, as additive shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignctl.nn.lm_head import linear_logps

IGNORE = -100


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items: int | torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy on the labelled (response) tokens: L = -(1/N) sum_t log p(y_t | x, y_<t).

    The seeds' SFT objective (course notes 002, "Formulation mathématique du SFT"), normalised by
    N = `num_items`, the number of labelled tokens in the optimiser step.

    Args:
        logits: (B, T, V) next-token logits; position t predicts token t + 1.
        labels: (B, T) target ids, IGNORE where no loss applies (prompt, padding).
        num_items: labelled tokens in the whole step (all micro-batches and processes).

    Returns:
        The loss share and metrics shares: ``mean_token_accuracy`` and ``num_loss_tokens``.
    """
    # Shift so that logits at t are scored against the token at t + 1.
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    token_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    with torch.no_grad():
        correct = ((logits.argmax(-1) == labels) & mask).sum()
    return token_loss / num_items, {
        "mean_token_accuracy": correct.float() / num_items,
        "num_loss_tokens": mask.sum().float(),
    }


def sft_loss_from_hidden(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_items: int | torch.Tensor, chunk: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`sft_loss` from the final hidden states (B, T, d) and the output weight (V, d): the output layer
    runs over the labelled positions only, `chunk` at a time (alignctl/nn/lm_head.py). Same value."""
    hidden, labels = hidden[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    out = linear_logps(hidden[mask], weight, labels[mask], chunk, with_argmax=True)
    return -out.logps.sum() / num_items, {
        "mean_token_accuracy": out.correct.sum().float() / num_items,
        "num_loss_tokens": mask.sum().float(),
    }


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses of the DPO family, all functions of the implicit reward margin.

    With h = (log pi(y+) - log pi_ref(y+)) - (log pi(y-) - log pi_ref(y-)):

    - ``sigmoid`` (DPO, Rafailov et al. 2023, eq. 7): -log sigma(beta h); with label smoothing eps
      (conservative DPO, Mitchell 2023): -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
    - ``robust`` (Chowdhury et al. 2024, eq. 7): the unbiased version of the smoothed loss,
      (-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps).
    - ``hinge`` (SLiC, Zhao et al. 2023): max(0, 1 - beta h).
    - ``ipo`` (Azar et al. 2023, eq. 17): (h - 1/(2 beta))^2, which pulls h toward 1/(2 beta).
    - ``simpo`` (Meng et al. 2024, eq. 6): reference-free, -log sigma(beta (log pi(y+) - log pi(y-)) - gamma);
      the caller passes length-normalised log-probs and zero reference log-probs.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) sequence log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference (zeros when reference-free).
        beta: the KL coefficient (> 0).
        loss_type: sigmoid | robust | hinge | ipo | simpo.
        label_smoothing: eps, the probability that a preference label is flipped (sigmoid, robust).
        simpo_gamma: the target reward margin of SimPO.

    Returns:
        (B,) losses and (B,) per-pair metrics: the implicit rewards beta * (log pi - log pi_ref)
        of chosen and rejected responses.
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    margin = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * margin) + label_smoothing * F.logsigmoid(-beta * margin)) / (
            1 - 2 * label_smoothing
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    elif loss_type == "simpo":
        logits = beta * margin - simpo_gamma
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    chosen_rewards = beta * chosen_ratio.detach()
    rejected_rewards = beta * rejected_ratio.detach()
    return losses, {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}


def reward_model_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coefficient: float = 0.0,
) -> torch.Tensor:
    """Per-pair Bradley-Terry loss: -log sigma(r(x, y+) - r(x, y-) - m).

    Bradley & Terry (1952); InstructGPT (Ouyang et al. 2022, eq. 1). The optional margin m
    (Llama 2, Touvron et al. 2023, eq. 2) asks for a larger gap on clearly separated pairs, and
    the centering term c (r(y+) + r(y-))^2 (Eisenstein et al. 2023) keeps rewards near zero, which
    the loss alone leaves free (it sees only differences).

    Args:
        chosen_scores, rejected_scores: (B,) scalar rewards.
        margin: (B,) optional required margins.
        center_coefficient: c >= 0.

    Returns:
        (B,) losses.
    """
    gap = chosen_scores - rejected_scores
    if margin is not None:
        gap = gap - margin
    losses = -F.logsigmoid(gap)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen_scores + rejected_scores) ** 2
    return losses


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example KTO losses from unpaired binary feedback (Ethayarajh et al. 2024, eq. 8).

    With r = log pi(y|x) - log pi_ref(y|x) and the reference point z = max(0, KL estimate):
    desirable examples cost lambda_D (1 - sigma(beta (r - z))), undesirable ones
    lambda_U (1 - sigma(beta (z - r))). z is estimated from mismatched prompt/completion pairs and
    carries no gradient.

    Args:
        policy_logps, ref_logps: (B,) sequence log-probs.
        desirable: (B,) bool labels.
        kl: scalar KL estimate (detached; clamped at 0 here).
        beta, desirable_weight, undesirable_weight: as in the paper.

    Returns:
        (B,) losses and {"rewards": (B,) beta * r, "kl": z, the reference point the losses used}.
    """
    ratio = policy_logps - ref_logps
    z = kl.detach().clamp(min=0)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio))),
    )
    return losses, {"rewards": beta * ratio.detach(), "kl": z}


# ------------------------------------------------------------------------------------ online RL
# Per-token tensors below are (B, T) with a 0/1 `mask` marking completion tokens; the masked
# positions may hold anything (they are multiplied out).


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020, "Approximating KL").

    With d = log pi_ref - log pi at the sampled token: ``k1`` = -d (unbiased, can be negative),
    ``k2`` = d^2 / 2 (biased, low variance), ``k3`` = exp(d) - d - 1 (unbiased and always >= 0;
    what GRPO uses, DeepSeekMath eq. 4).
    """
    d = ref_logps - logps
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: k1, k2, k3")


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str = "grpo", eps: float = 1e-4) -> torch.Tensor:
    """Advantages of N = prompts x K completions, K consecutive completions per prompt.

    - ``grpo`` (DeepSeekMath, Shao et al. 2024, eq. 3 outcome supervision): (r - mean_group) / (std_group + eps).
    - ``dr_grpo`` (Liu et al. 2025, "Understanding R1-Zero-like training"): r - mean_group; dividing
      by the std over-weights prompts that are almost always right or almost always wrong.
    - ``rloo`` (Ahmadian et al. 2024): r minus the mean of the *other* K - 1 completions.
    - ``reinforce``: plain REINFORCE with one baseline, the mean reward of the whole batch.
    - ``reinforce_pp`` (REINFORCE++-baseline, Hu et al. 2025): r - mean_group, divided by the std of
      those over the whole batch.

    Args:
        rewards: (N,) one scalar per completion; N must be a multiple of `group_size`.

    Returns:
        (N,) advantages, without gradient.
    """
    rewards = rewards.detach().float()
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size)
    mean = groups.mean(-1, keepdim=True)
    if estimator == "grpo":
        std = groups.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
        return ((groups - mean) / (std + eps)).view(-1)
    if estimator == "dr_grpo":
        return (groups - mean).view(-1)
    if estimator == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs at least 2 completions per prompt")
        others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
        return (groups - others).view(-1)
    if estimator == "reinforce":
        return rewards - rewards.mean()
    if estimator == "reinforce_pp":
        # REINFORCE++-baseline (Hu et al. 2025, "REINFORCE++", sec. 3): the group mean as baseline, then
        # the whole batch's std as scale (global, not per group: per-group scaling is what biases GRPO).
        centred = groups - mean
        return (centred / (centred.std() + eps) if centred.numel() > 1 else centred).view(-1)
    raise ValueError(f"unknown advantage estimator {estimator!r}; valid: grpo, dr_grpo, rloo, reinforce, reinforce_pp")


def clipped_surrogate(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A), rho = pi / pi_old
    (Schulman et al. 2017, eq. 7; a separate upper bound eps_high as in DAPO, Yu et al. 2025).

    Args:
        logps, old_logps: (B, T) log-probs of the sampled tokens now and at sampling time.
        advantages: (B, T), or (B,) for one advantage per sequence.

    Returns:
        (B, T) losses and (B, T) bool: where the clipped term was the one taken (the clip fraction).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(logps - old_logps)
    upper = 1 + (epsilon if epsilon_high is None else epsilon_high)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon, upper) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped).detach()


@dataclass
class Surrogate:
    """A policy-gradient loss per token and what its importance ratios did (all (B, T))."""

    loss: torch.Tensor  # per-token loss, to `aggregate`
    weight: torch.Tensor  # the importance ratio each token's gradient is weighted by (detached)
    clipped_low: torch.Tensor  # bool: clipped below (ratio < 1 - eps with A < 0): no gradient from this token
    clipped_high: torch.Tensor  # bool: clipped above (ratio > 1 + eps_high with A > 0), or CISPO's capped weight


def _clip(ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float | None) -> Surrogate:
    upper = 1 + (epsilon if epsilon_high is None else epsilon_high)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon, upper) * advantages
    taken = (clipped < unclipped).detach()
    return Surrogate(-torch.min(unclipped, clipped), ratio.detach(), taken & (advantages < 0), taken & (advantages > 0))


def token_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                    epsilon_high: float | None = None) -> Surrogate:
    """PPO's clipped surrogate per token (`clipped_surrogate`), with the clipped tokens split by side."""
    return _clip(torch.exp(logps - old_logps), _per_token(advantages), epsilon, epsilon_high)


def gspo_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                   epsilon_high: float | None = None) -> Surrogate:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", eqs. 5-7 and 13): one importance
    ratio per completion, s_i = exp(mean_t log(pi / pi_old)) over its tokens, clipped as PPO clips a
    token's: -min(s_i A_i, clip(s_i, 1 - eps, 1 + eps_high) A_i).

    In the GSPO-token form (eq. 13) every token carries s_i,t = sg(s_i) pi(y_t) / sg(pi(y_t)): its value
    is s_i, its gradient s_i grad log pi(y_t). Averaged over a completion's tokens (loss_aggregation=
    sequence) that is exactly the gradient of the sequence objective, s_i A_i mean_t grad log pi(y_t).
    With s_i = 1 (one pass over a fresh rollout) it is the on-policy gradient, length-normalised.
    The paper's clip ranges are far smaller than PPO's (eps 3e-4, eps_high 4e-4): a sequence ratio
    moves much less than a token's."""
    mask = mask.to(logps.dtype)
    sequence_log_ratio = ((logps - old_logps) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    ratio = torch.exp(sequence_log_ratio.detach() + logps - logps.detach())
    return _clip(ratio, _per_token(advantages), epsilon, epsilon_high)


def cispo_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon_high: float) -> Surrogate:
    """CISPO (MiniMax-M1, MiniMax 2025, eq. 4): -sg(min(r, 1 + eps_high)) A log pi, r = pi / pi_old.

    The importance weight is capped and detached, but no token loses its gradient: PPO's clip zeroes
    the gradient of a clipped token, which drops exactly the rare tokens that open new reasoning paths.
    With r = 1 it is REINFORCE with the group advantage."""
    weight = torch.exp(logps - old_logps).detach()
    capped = weight.clamp(max=1 + epsilon_high)
    advantages = _per_token(advantages)
    none = torch.zeros_like(weight, dtype=torch.bool)
    return Surrogate(-capped * advantages * logps, capped, none, weight > 1 + epsilon_high)


def policy_surrogate(kind: str, logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                     epsilon: float, epsilon_high: float | None = None) -> Surrogate:
    """recipe.policy_loss: ``ppo_clip`` (`token_surrogate`), ``gspo`` or ``cispo`` (whose cap is 1 + eps_high, or 1 + eps)."""
    if kind == "gspo":
        return gspo_surrogate(logps, old_logps, mask, advantages, epsilon, epsilon_high)
    if kind == "cispo":
        return cispo_surrogate(logps, old_logps, advantages, epsilon if epsilon_high is None else epsilon_high)
    if kind == "ppo_clip":
        return token_surrogate(logps, old_logps, advantages, epsilon, epsilon_high)
    raise ValueError(f"unknown policy loss {kind!r}; valid: ppo_clip, gspo, cispo")


def _per_token(advantages: torch.Tensor) -> torch.Tensor:
    return advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), a reward added per completion:
    0 up to max_length - buffer tokens, then falling linearly to -1 at max_length (and -1 beyond), so a
    completion cut at the limit is punished without a cliff between almost-too-long and too-long."""
    lengths = lengths.float()
    start = max_length - buffer
    return ((start - lengths) / buffer).clamp(min=-1.0, max=0.0) if buffer > 0 else torch.zeros_like(lengths)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, level: str, num_items: int | torch.Tensor) -> torch.Tensor:
    """A micro-batch's share of the step mean of a per-token quantity.

    ``token`` (DAPO): every token of the step weighs the same; `num_items` = completion tokens in the step.
    ``sequence`` (the original GRPO): mean over each completion's tokens, then over completions;
    `num_items` = completions in the step.
    """
    mask = mask.to(per_token.dtype)
    if level == "token":
        return (per_token * mask).sum() / num_items
    if level == "sequence":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / num_items
    raise ValueError(f"unknown loss aggregation {level!r}; valid: token, sequence")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / std over the masked positions only (mean kept when shift_mean is false)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over each completion's tokens.

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma lam A_{t+1};  returns R_t = A_t + V(s_t).
    The value after a completion's last token is 0 (the episode ends), whichever side it is padded on;
    tokens masked out between sampled ones (an environment's turn) are skipped.

    Args:
        rewards, values, mask: (B, T).

    Returns:
        (B, T) advantages and returns, without gradient (zero where mask is 0).
    """
    rewards, values, mask = rewards.detach(), values.detach(), mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(running)  # V of the next masked token: 0 after the last
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # A masked-out token inside a row (an environment's reply in a multi-turn episode) is skipped:
        # the next sampled token's state follows directly, as if the reply were part of the transition.
        inside = mask[:, t].bool()
        running = torch.where(inside, delta + gamma * lam * running, running)
        next_value = torch.where(inside, values[:, t], next_value)
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2) (the PPO2 value loss) and where clipping bit."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    plain_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.max(plain_error, clipped_error), (clipped_error > plain_error).detach()


def score_to_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """PPO's per-token rewards (Ziegler et al. 2019; InstructGPT eq. 2): -beta KL_t at every token and
    the sequence score added at each completion's last token.

    Args:
        scores: (B,) sequence rewards; kl: (B, T) per-token KL estimates; mask: (B, T).
    """
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl.detach() * mask
    # Index of the last completion token of each row, whichever side the row is padded on.
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    last = (positions * mask).argmax(-1)
    return rewards.scatter_add(1, last.unsqueeze(-1), scores.detach().to(kl.dtype).unsqueeze(-1))


def logprob_gap(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sampler/trainer mismatch over completion tokens: mean and max of |log π_trainer − log μ_sampler|.

    Exactly 0 when the sampler's log-probs are the trainer's. Returns ``rollout/logprob_diff`` and
    ``rollout/logprob_diff_max`` (a name ending in ``_max`` is reduced by max, not summed)."""
    mask = mask.bool()
    gap = (trainer_logps.float() - sampler_logps.float()).abs()[mask]
    if gap.numel() == 0:
        zero = torch.zeros((), dtype=torch.float64)
        return {"rollout/logprob_diff": zero, "rollout/logprob_diff_max": zero}
    return {"rollout/logprob_diff": gap.double().mean(), "rollout/logprob_diff_max": gap.double().max()}


def rollout_correction(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, mode: str, level: str,
                       cap: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights that correct for sampling from μ (the rollout engine) while training π_old (the trainer).

    With ratio ρ = π_old/μ = exp(log π_old − log μ) per token (``level=token``), or per completion as
    exp(Σ_t (log π_old − log μ)) over its tokens (``level=sequence``):

    - ``truncate`` (TIS, Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
      training", eq. 3): w = min(ρ, cap), multiplying the per-token policy-gradient loss;
    - ``mask`` (masked IS, MIS, as verl's ``rollout_is=mask`` and TRL's ``vllm_importance_sampling_mode``):
      w = 1 where 1/cap ≤ ρ ≤ cap and 0 elsewhere: tokens (or whole completions) off by more are dropped;
    - ``off``: w = 1.

    Weights are detached (no gradient flows through μ or π_old). When the log-probs agree, ρ = 1 and
    every weight is 1 for cap ≥ 1: the identity.

    Args:
        trainer_logps, sampler_logps: (B, T) per-token log-probs of the sampled tokens.
        mask: (B, T) completion tokens.
        mode: off, truncate or mask. level: token or sequence. cap: > 0 (ratios above are truncated or masked).

    Returns:
        (B, T) weights (0 outside the mask) and metrics over the completion tokens:
        ``rollout/is_weight_mean``, ``rollout/is_weight_max`` and ``rollout/is_masked_frac``.
    """
    mask_f = mask.float()
    log_ratio = (trainer_logps.detach().float() - sampler_logps.float()) * mask_f
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(mask_f)
    elif level != "token":
        raise ValueError(f"unknown rollout_is_level {level!r}; valid: token, sequence")
    ratio = torch.exp(log_ratio.clamp(max=80.0))  # exp(80) is finite in float32; anything past the cap is capped anyway
    if mode == "off":
        weights = torch.ones_like(ratio)
    elif mode == "truncate":
        weights = ratio.clamp(max=cap)
    elif mode == "mask":
        weights = ((ratio <= cap) & (ratio >= 1.0 / cap)).float()
    else:
        raise ValueError(f"unknown rollout_is {mode!r}; valid: off, truncate, mask")
    weights = weights * mask_f
    tokens = mask_f.sum().clamp(min=1)
    masked = ((weights == 0) & mask.bool()).float().sum() / tokens
    metrics = {"rollout/is_weight_mean": (weights.sum() / tokens).double(), "rollout/is_masked_frac": masked.double(),
               "rollout/is_weight_max": weights.max().double() if weights.numel() else torch.zeros((), dtype=torch.float64)}
    return weights.detach(), metrics
