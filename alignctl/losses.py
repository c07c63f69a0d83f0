"""Loss functions: pure tensor maths, no model, no config, no device logic.

Each returns ``(loss, metrics)``. Losses that a step splits over micro-batches take ``num_items``,
the number of items (tokens or sequences) in the whole optimiser step, and return their share of the
step's mean: summed over micro-batches (and processes) they give exactly the full-batch mean.
Metrics are returned the same way, as additive shares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
        (B,) losses and {"rewards": (B,) beta * r}.
    """
    ratio = policy_logps - ref_logps
    z = kl.detach().clamp(min=0)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio))),
    )
    return losses, {"rewards": beta * ratio.detach()}
