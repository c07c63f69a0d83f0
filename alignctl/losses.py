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
