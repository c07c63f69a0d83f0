"""Attention on CPU under bf16: the forward in bf16, its backward in float32.

torch's CPU flash-attention kernel is fast in bf16 forward and slow in bf16 backward: at SmolLM2-135M's
shapes (batch 4, 9 heads, 80 positions, head_dim 64) its bf16 forward takes 0.24 ms against 0.72 ms in
float32, and forward and backward 5.9 ms in bf16 against 2.4 ms in float32, casts included. So where a
gradient will flow, `FlashBackwardInFloat32` runs the kernel's bf16 forward (the one sdpa itself runs
under autocast, same output) and its float32 backward on float32 copies of what it saved, then returns
the gradients in the inputs' dtypes. It saves q, k and v as they came (bf16, key and value heads not
repeated: the kernel attends grouped queries itself), the output and one float a row: 2 MB a layer
where float32 attention kept 6 MB at a SmolLM2 reward step (8 rows of 84 tokens), about 120 MB a step.
Generation and reference forwards (no gradient) are sdpa itself. Where the flash kernel would not run
(dropout, an unsupported mask, a torch without these underscored operators), attention with a
gradient runs in float32 through sdpa.

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
# torch's CPU flash kernels as operators (underscored: not a public API); without them, float32 attention.
_FLASH_KERNELS = all(hasattr(torch.ops.aten, op) for op in ("_scaled_dot_product_flash_attention_for_cpu",
                                                            "_scaled_dot_product_flash_attention_for_cpu_backward"))
_FLASH = int(torch.nn.attention.SDPBackend.FLASH_ATTENTION)  # torch._fused_sdp_choice's answer for that kernel


def runs_in_float32(query: torch.Tensor) -> bool:
    """On CPU, with a gradient to compute, and in bf16 or fp16 (the tensor's own dtype or autocast's):
    where the backward runs in float32."""
    if query.device.type != "cpu" or not (torch.is_grad_enabled() and query.requires_grad):
        return False
    return query.dtype != torch.float32 or torch.is_autocast_enabled("cpu")


def _sdpa_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype sdpa computes and returns on CPU: autocast's where it is on (sdpa is on its
    lower-precision list), the query's otherwise."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype


def _float32_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    return mask.float() if mask is not None and mask.is_floating_point() else mask


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """sdpa's own conversion before its kernels: a boolean mask (True = attend) becomes 0 / -inf in `dtype`."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class FlashBackwardInFloat32(torch.autograd.Function):
    """torch's CPU flash attention: the forward in the inputs' dtype, the backward in float32 (see the
    module docstring). Key and value may have fewer heads than the query (grouped queries)."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, scale: float | None) -> torch.Tensor:
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=mask, scale=scale)
        ctx.save_for_backward(query, key, value, out, logsumexp, mask)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        query, key, value, out, logsumexp, mask = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.float(), query.float(), key.float(), value.float(), out.float(), logsumexp, 0.0, ctx.is_causal,
            attn_mask=_float32_mask(mask), scale=ctx.scale)
        return (*(g.to(t.dtype) for g, t in zip(grads, (query, key, value))), None, None, None)


def _flash_backward_in_float32(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                               enable_gqa=False) -> torch.Tensor | None:
    """`FlashBackwardInFloat32` with sdpa's arguments, or None where sdpa would not run the flash kernel
    (then attention runs in float32 through sdpa)."""
    dtype = _sdpa_dtype(query)
    if not _FLASH_KERNELS or dropout_p or dtype == torch.float32 or (attn_mask is not None and attn_mask.requires_grad):
        return None
    with torch.autocast("cpu", enabled=False):
        query, key, value = (t.to(dtype) for t in (query, key, value))
        mask = _additive_mask(attn_mask, dtype)
        choice = torch._fused_sdp_choice(query, key, value, mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa)
        if choice != _FLASH or (key.size(1) != query.size(1) and not enable_gqa):
            return None
        return FlashBackwardInFloat32.apply(query, key, value, mask, is_causal, scale)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """torch's scaled_dot_product_attention, its backward in float32 where `runs_in_float32` says so."""
    if not runs_in_float32(query):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, **kwargs)
    out = _flash_backward_in_float32(query, key, value, attn_mask, **kwargs)
    if out is not None:
        return out
    # Float32 attention, its output in the dtype sdpa would have returned.
    dtype = _sdpa_dtype(query)
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=_float32_mask(attn_mask), **kwargs)
    return out.to(dtype)


class _FloatBackwardSdpa(torch.overrides.TorchFunctionMode):
    """Within transformers' sdpa attention function, its call to sdpa goes to `sdpa` above."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return sdpa(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention function, its backward in float32 where `runs_in_float32` says so.

    There, a training forward (as many keys as queries, no position bias or softcap) calls `sdpa`
    itself with the key and value heads as the model gave them, one per group: transformers' own
    function repeats them for a masked batch (its CUDA kernels want that), which costs a copy of each
    and, kept for backward, their memory. Anything else goes through transformers' function."""
    if not runs_in_float32(query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    extras = kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None or kwargs.get("output_attentions")
    if extras or key.size(2) != query.size(2) or query.size(1) % key.size(1):
        with _FloatBackwardSdpa():
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    # transformers' rule: causal by the flag only without a mask (a mask carries causality itself)
    causal = query.size(2) > 1 and attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    out = sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
               enable_gqa=key.size(1) != query.size(1))
    return out.transpose(1, 2).contiguous(), None


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
