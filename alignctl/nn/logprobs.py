"""Sequence log-probabilities for preference and RL stages, computed where they are needed only.

Batches are left-padded (prompt + response) with explicit position ids, so every row's response
ends at the last position. Only response positions reach the vocabulary projection: with
``recipe.lm_head_chunk`` > 0 the output layer runs over the response tokens alone, a chunk at a time
(alignctl/nn/lm_head.py); with 0 the model computes logits for the last K positions only
(``logits_to_keep``, K = longest response + 1). Either way no full-vocabulary float32 log-softmax of
the whole sequence is ever built. Padding-free batches (alignctl/nn/prompt_groups.py) run through the
same output-layer paths, at their response tokens' predecessors only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from alignctl.data.batching import pad
from alignctl.nn.lm_head import final_hidden, keep_last, linear_logps, output_head
from alignctl.nn.model_parts import unwrapped
from alignctl.nn.prompt_groups import attention_layout, rows_end_to_end
from alignctl.nn.varlen_attention import applies as varlen_applies
from alignctl.nn.varlen_attention import packed_attention
from alignctl.nn.varlen_attention import pays as varlen_pays


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


def response_token_logps(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk: int = 0,
    entropy_grad: bool = False,
    padding_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of each row's response under `model`, over the last W positions.

    Args:
        batch: from `left_padded_batch` (on the model's device).
        temperature: logits are divided by it first, so that log-probs match the sampling
            distribution of a rollout drawn at that temperature.
        with_entropy: also return the entropy of the next-token distribution at each position
            (differentiable on the chunked path; on the plain path only with `entropy_grad`, since
            it keeps the (B, W, vocab) log-softmax for backward).
        chunk: > 0 computes the output layer over the response tokens only, that many at a time,
            never holding their logits whole (alignctl/nn/lm_head.py; recipe.lm_head_chunk); 0 is the
            plain path.
        padding_free: run the batch without padding where the model's attention allows it
            (alignctl/nn/prompt_groups.py: each prompt once, or under a flash kernel each row with its
            own prompt); the padded rows otherwise.

    Returns:
        (B, W) log p(token), zero outside the response; (B, W) response mask (W = longest response);
        (B, W) entropies or None.
    """
    mask = batch["response_mask"]
    width = int(mask.sum(-1).max())
    packed = _packed_layout(model, batch, width) if padding_free else None
    if packed is not None:
        return _packed_token_logps(model, batch, width, *packed, temperature, with_entropy, chunk, entropy_grad)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    targets = batch["input_ids"][:, -width:]
    keep = mask[:, -width:].to(torch.float32)
    head = output_head(model) if chunk else None
    if head is not None:
        # Hidden states at t predict the token at t + 1: the W positions before the last one.
        hidden = final_hidden(model, **inputs)[:, -width - 1 : -1]
        where = keep.bool()
        out = linear_logps(hidden[where], head.weight, targets[where], chunk, temperature, with_entropy=with_entropy)
        per_token = torch.zeros_like(keep).masked_scatter(where, out.logps)
        entropy = torch.zeros_like(keep).masked_scatter(where, out.entropy) if with_entropy else None
        return per_token, keep, entropy
    logits = model(**inputs, logits_to_keep=keep_last(inputs["input_ids"], width + 1), use_cache=False).logits
    # Logits at position t score the token at t + 1: the first kept position predicts the first
    # response token of the longest row; the last kept position predicts nothing.
    logits = logits[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    per_token = token_logps(logits, targets) * keep
    entropy = None
    if with_entropy:
        with contextlib.nullcontext() if entropy_grad else torch.no_grad():
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1) * keep
    return per_token, keep, entropy


def _packed_layout(model: torch.nn.Module, batch: dict[str, torch.Tensor], width: int) -> tuple[dict, tuple | None] | None:
    """The packed row this model can run for the batch and its attention layout: each prompt once where
    alignctl's per-sequence attention stands in for the model's; under a flash kernel the rows end to end
    (no layout: the kernel keeps them apart by their position ids); None (padded rows) otherwise."""
    if "packed_ids" in batch and varlen_applies(model):
        return batch, attention_layout(batch)
    if varlen_pays(model):
        fields = rows_end_to_end(batch, width)
        return (fields, None) if fields is not None else None
    return None


def _packed_token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], width: int, fields: dict[str, torch.Tensor], layout: tuple | None,
                        temperature: float, with_entropy: bool, chunk: int, entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`response_token_logps` over a packed row (`fields`, alignctl/nn/prompt_groups.py), scattered back to (B, W)."""
    keep = batch["response_mask"][:, -width:].to(torch.float32)
    logps, entropy = _packed_logps(model, fields, layout, temperature, with_entropy, chunk, entropy_grad)

    def right_aligned(values: torch.Tensor) -> torch.Tensor:
        return keep.new_zeros(keep.numel()).index_copy(0, fields["packed_slots"], values.float()).view_as(keep)

    return right_aligned(logps), keep, right_aligned(entropy) if entropy is not None else None


def _packed_logps(model: torch.nn.Module, fields: dict[str, torch.Tensor], layout: tuple | None, temperature: float, with_entropy: bool,
                  chunk: int, entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(M,) log p of each response token of a packed row, in the fields' order, and (M,) entropies or None."""
    ids, positions = fields["packed_ids"], fields["packed_positions"]
    targets, predictors = ids[0, fields["packed_targets"]], fields["packed_predictors"]
    head = output_head(model) if chunk else None
    entropy = None
    with packed_attention(model, positions, layout=layout):
        if head is not None:
            hidden = final_hidden(model, input_ids=ids, position_ids=positions)[0, predictors]
            out = linear_logps(hidden, head.weight, targets, chunk, temperature, with_entropy=with_entropy)
            logps, entropy = out.logps, out.entropy
        else:
            # logits_to_keep as the predictors' positions: the output layer runs at those only.
            logits = model(input_ids=ids, position_ids=positions, logits_to_keep=predictors, use_cache=False).logits[0]
            if temperature != 1.0:
                logits = logits / temperature
            logps = token_logps(logits, targets)
            if with_entropy:
                with contextlib.nullcontext() if entropy_grad else torch.no_grad():
                    log_probs = torch.log_softmax(logits.float(), dim=-1)
                    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logps, entropy


def packed_response_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_logps` over a packed batch (alignctl/nn/prompt_groups.py): summed log-probs of each row's
    response and its length, (B,), (B,). Each prompt once (`prompt_group_fields`: alignctl's attention,
    with the batch's layout), or the rows end to end (`rows_end_to_end`: attention per row, FlashAttention-2's
    varlen kernel or alignctl's)."""
    layout = attention_layout(batch) if "packed_gather" in batch else None
    logps, _ = _packed_logps(model, batch, layout, 1.0, False, chunk, False)
    rows, num_rows = batch["packed_rows"], int(batch["num_rows"])
    sums = logps.new_zeros(num_rows).index_add(0, rows, logps)
    return sums, torch.bincount(rows, minlength=num_rows).to(logps.dtype)


def response_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's response under `model`, and the response lengths: (B,), (B,)."""
    per_token, keep, _ = response_token_logps(model, batch, chunk=chunk)
    return per_token.sum(-1), keep.sum(-1)


def response_values(value_model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token values V(s_t) of a scalar-head model (a sequence classifier, peft-wrapped or not).

    The state before response token t is the prefix ending at position t - 1, so values are read
    where the logits that predict the token are: the W positions before the last one.

    Returns:
        (B, W) float32 values, aligned with `response_token_logps` (W = longest response).
    """
    # The classifier's own forward pools one position: take its last hidden states and apply its head
    # to every position. Through the model's own forward, so a sharded (FSDP) model gathers its weights.
    base = unwrapped(value_model)
    width = int(batch["response_mask"].sum(-1).max())
    hidden = value_model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
        output_hidden_states=True,
    ).hidden_states[-1]
    return base.score(hidden[:, -width - 1 : -1]).squeeze(-1).float()
