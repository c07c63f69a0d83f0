"""Attention on CPU under bf16: the training pass in float32, the rest in bf16.

torch's CPU flash-attention kernel runs its backward in bf16 far slower than in float32: at
SmolLM2-135M's shapes (batch 4, 9 heads, 80 positions, head_dim 64) forward and backward take 5.9 ms
in bf16 against 2.4 ms in float32, casts included, so bf16 attention cost a SmolLM2 LoRA step about
0.1 s of its 0.5 s. Its bf16 forward is the faster one (0.24 ms against 0.72 ms). So where a
gradient will flow, q, k and v go to sdpa in float32 and the output comes back in the dtype sdpa
would have returned; generation and reference forwards (no gradient) keep the bf16 kernel. float32
attention is the more exact of the two, so nothing is lost.

`NAME` is transformers' sdpa with that rule, registered in its attention-function registry;
`use_on_cpu` switches a model loaded on CPU with sdpa to it. `sdpa` is the same rule for alignctl's
own attention calls (padding-free rows, the reward model's top layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

NAME = "alignctl_sdpa"


def runs_in_float32(query: torch.Tensor) -> bool:
    """On CPU, with a gradient to compute, and in bf16 or fp16 (the tensor's own dtype or autocast's)."""
    if query.device.type != "cpu" or not (torch.is_grad_enabled() and query.requires_grad):
        return False
    return query.dtype != torch.float32 or torch.is_autocast_enabled("cpu")


def _float32_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    return mask.float() if mask is not None and mask.is_floating_point() else mask


def _in_float32(attend, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None):
    """attend(query, key, value, mask) in float32 with autocast off, its output (first of a tuple)
    back in the dtype sdpa would have returned: autocast's where it is on (sdpa is on its
    lower-precision list), the query's otherwise."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    with torch.autocast("cpu", enabled=False):
        out = attend(query.float(), key.float(), value.float(), _float32_mask(mask))
    return (out[0].to(dtype), *out[1:]) if isinstance(out, tuple) else out.to(dtype)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """torch's scaled_dot_product_attention, in float32 where `runs_in_float32` says so."""
    if not runs_in_float32(query):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, **kwargs)
    return _in_float32(lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs), query, key, value, attn_mask)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention function, in float32 where `runs_in_float32` says so."""
    if not runs_in_float32(query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return _in_float32(lambda q, k, v, mask: sdpa_attention_forward(module, q, k, v, mask, **kwargs), query, key, value, attention_mask)


AttentionInterface.register(NAME, attention_forward)
# The masks sdpa gets (transformers builds none at all for a name it has no mask function for).
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_on_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a CPU model that transformers set up with sdpa to `NAME` (in place; returns the model).
    Other backends (eager, flash) and GPU models are left as they are."""
    config = getattr(model, "config", None)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and config is not None and getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    return model
