"""Preference pairs with their prompt computed once (``recipe.share_prompt``).

A preference pair is one prompt with two responses. Run as two rows, the prompt goes through the
model twice, forward and backward. Here the prompt runs once, left-padded, into a KV cache; the
cache is repeated for the pair's two responses, which run right-padded after it, attending to the
prompt through the cache (gradients flow back through it into the prompt's activations). The
log-probs are those of the two-row layout up to float rounding (tested), with about a quarter fewer
tokens through the model when prompts are as long as responses. This is prefix sharing for DPO
(Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing").

Rows come back in the two-row layout's order: every first response, then every second.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from alignctl.data.batching import pad
from alignctl.nn.kv_cache import CACHE_ARG
from alignctl.nn.lm_head import keep_last, linear_logps, output_head
from alignctl.nn.logprobs import token_logps
from alignctl.nn.model_parts import checkpointing_on


def shared_prompt_batch(prompts: Sequence[Sequence[int]], first: Sequence[Sequence[int]], second: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded (B, P); responses right-padded (2B, R), the two of prompt i in rows 2i and 2i + 1."""
    prompt_mask = pad([[1] * len(p) for p in prompts], 0, side="left")
    responses = [r for pair in zip(first, second) for r in pair]
    return {
        "prompt_ids": pad(prompts, pad_id, side="left"),
        "prompt_mask": prompt_mask,
        "prompt_positions": (prompt_mask.cumsum(-1) - 1).clamp(min=0),
        "response_ids": pad(responses, pad_id),
        "response_mask": pad([[1] * len(r) for r in responses], 0),
    }


def applies(model: torch.nn.Module) -> bool:
    """Whether the model keeps a cache in this mode: gradient checkpointing turns transformers' cache off."""
    return not checkpointing_on(model)


def shared_prompt_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response lengths, (2B,) each: every first response, then every second.

    chunk > 0: the output layer runs over the response tokens only (alignctl/nn/lm_head.py); 0: the
    model's own logits."""
    prompt_mask, responses, response_mask = batch["prompt_mask"], batch["response_ids"], batch["response_mask"]
    head = output_head(model) if chunk else None
    cache = DynamicCache(config=model.config)
    extra = {"output_hidden_states": True} if head is not None else {}
    prompt_out = model(input_ids=batch["prompt_ids"], attention_mask=prompt_mask, position_ids=batch["prompt_positions"],
                       **{CACHE_ARG: cache}, use_cache=True, logits_to_keep=keep_last(batch["prompt_ids"], 1), **extra)
    cache.batch_repeat_interleave(2)
    width = responses.size(1)
    positions = batch["prompt_positions"][:, -1:].repeat_interleave(2, dim=0) + 1 + torch.arange(width, device=responses.device)
    attention_mask = torch.cat([prompt_mask.repeat_interleave(2, dim=0), response_mask], dim=1)
    response_out = model(input_ids=responses, attention_mask=attention_mask, position_ids=positions, **{CACHE_ARG: cache}, use_cache=True,
                         logits_to_keep=keep_last(responses, 1) if head is not None else 0, **extra)
    keep = response_mask.to(torch.float32)
    # Response token j is predicted by the position before it: the prompt's last one for j = 0.
    if head is not None:
        prompt_last = prompt_out.hidden_states[-1][:, -1:].repeat_interleave(2, dim=0)
        hidden = torch.cat([prompt_last, response_out.hidden_states[-1][:, :-1]], dim=1)
        where = keep.bool()
        per_token = torch.zeros_like(keep).masked_scatter(where, linear_logps(hidden[where], head.weight, responses[where], chunk).logps)
    else:
        logits = torch.cat([prompt_out.logits[:, -1:].repeat_interleave(2, dim=0), response_out.logits[:, :-1]], dim=1)
        per_token = token_logps(logits, responses) * keep
    pairs = prompt_mask.size(0)
    order = torch.cat([torch.arange(0, 2 * pairs, 2), torch.arange(1, 2 * pairs, 2)]).to(responses.device)
    return per_token.sum(-1)[order], keep.sum(-1)[order]
