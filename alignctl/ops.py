"""Sequence log-probabilities for preference and RL stages, computed where they are needed only.

Batches are left-padded (prompt + response) with explicit position ids, so every row's response
ends at the last position. The model then computes logits for the last K positions only
(``logits_to_keep``), K = longest response + 1: prompt positions never reach the vocabulary
projection, and no full-vocabulary float32 log-softmax of the whole sequence is ever built.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignctl.batching import pad


def left_padded_batch(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, position_ids and response_mask for prompt + response rows.

    Returns tensors of shape (B, T); response_mask marks response tokens. The response length
    of the longest row is ``response_mask.sum(-1).max()``.
    """
    sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
    input_ids = pad(sequences, pad_id, side="left")
    attention_mask = pad([[1] * len(s) for s in sequences], 0, side="left")
    response_mask = pad([[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)], 0, side="left")
    # Positions count real tokens only, so a left-padded row computes exactly what it would alone.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "response_mask": response_mask}


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position: logit[target] - logsumexp(logits), in float32.

    Args:
        logits: (B, K, V); targets: (B, K). Returns (B, K).
    """
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def response_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's response under `model`, and the response lengths.

    Args:
        batch: from `left_padded_batch` (on the model's device).

    Returns:
        (B,) sum of log p(response token), (B,) number of response tokens.
    """
    mask = batch["response_mask"]
    width = int(mask.sum(-1).max())
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=width + 1,
        use_cache=False,
    ).logits
    # Logits at position t score the token at t + 1: the first kept position predicts the first
    # response token of the longest row; the last kept position predicts nothing.
    targets = batch["input_ids"][:, -width:]
    keep = mask[:, -width:].to(logits.dtype)
    per_token = token_logps(logits[:, :-1], targets) * keep
    return per_token.sum(-1), keep.sum(-1)
