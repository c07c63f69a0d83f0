"""Padding-free batches without a varlen kernel: the linear layers see real tokens only, attention runs per sequence.

A padding-free batch is its rows end to end in one row, kept apart by position ids that restart at 0
(``recipe.padding_free``). On a GPU, FlashAttention-2's varlen kernel attends within each sequence
directly (transformers finds the boundaries in the position ids). Elsewhere transformers falls back
to a block-diagonal mask over the whole packed row, which costs (total tokens)^2 attention instead
of sum(length^2): far slower than the padded batch it replaces.

`varlen_sdpa` keeps the packed layout everywhere except inside attention: each layer's q, k and v
are gathered into a right-padded (sequences x heads x longest x head_dim) batch, causal sdpa runs on
it, and the real positions are gathered back. With right padding and a causal mask no real query
ever sees a padding key, so no padding mask is needed and the result is exactly per-sequence
attention; padding slots repeat a real token (finite values) and their outputs are dropped, so their
gradients are zero. The projections, MLPs, norms and rotary embeddings, most of a step, then run on
real tokens only.

`packed_attention(model, position_ids)` switches a model to it for one forward and works out the
gather indices once for all its layers; transformers calls it through its attention-function
registry (``AttentionInterface``), and builds no mask for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers import AttentionInterface

from alignctl.nn import cpu_attention
from alignctl.nn.model_parts import checkpointing_on

NAME = "alignctl_varlen_sdpa"
# Backends that transformers would run over the packed row with a block-diagonal mask; the flash
# kernels handle packed rows themselves and are left alone.
REPLACED = ("sdpa", cpu_attention.NAME, "eager")


def sequence_bounds(position_ids: torch.Tensor) -> torch.Tensor:
    """cu_seqlens of a packed row: (sequences + 1,) start offsets and the total, from positions restarting at 0."""
    positions = position_ids.reshape(-1)
    starts = torch.nonzero(positions == 0).squeeze(1)
    return torch.cat([starts, starts.new_tensor([positions.numel()])])


def padding_index(bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For each (sequence, slot) of the padded batch, the packed position it reads (padding slots
    repeat the sequence's last token), the packed positions of the real slots in order, and the
    longest length."""
    starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
    longest = int(lengths.max())
    slots = torch.arange(longest, device=bounds.device)
    gather = starts[:, None] + torch.minimum(slots[None, :], lengths[:, None] - 1)
    real = torch.nonzero((slots[None, :] < lengths[:, None]).reshape(-1)).squeeze(1)
    return gather.reshape(-1), real, longest


# The current packed forward's (gather, real, longest), set by `packed_attention`: the same for every
# layer, so it is worked out once per forward rather than once per layer (it syncs with the device).
_layout: ContextVar[tuple[torch.Tensor, torch.Tensor, int] | None] = ContextVar("alignctl_varlen_layout", default=None)


def varlen_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                **_) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (1, heads, tokens, head_dim) packed q, k, v in,
    (1, tokens, heads, head_dim) out."""
    layout = _layout.get()
    if query.size(0) != 1 or layout is None or attention_mask is not None:
        raise ValueError("alignctl: varlen attention takes one packed row, inside packed_attention, and no mask")
    gather, real, longest = layout
    sequences = gather.numel() // longest
    groups = getattr(module, "num_key_value_groups", 1)

    def padded(states: torch.Tensor) -> torch.Tensor:  # (1, h, tokens, d) -> (sequences, h, longest, d)
        # Token-major: transformers' q, k, v are transposed views of (tokens, h * d) projections, so
        # this gathers whole contiguous rows (several times faster than gathering along dim 2).
        heads, dim = states.size(1), states.size(-1)
        rows = states[0].transpose(0, 1).reshape(-1, heads * dim).index_select(0, gather)
        return rows.view(sequences, longest, heads, dim).transpose(1, 2)

    # Key and value heads once per group: sdpa attends grouped queries itself, with no mask here
    # (the case where transformers' CUDA path takes them unrepeated too).
    out = cpu_attention.sdpa(
        padded(query), padded(key), padded(value),
        is_causal=True, scale=scaling, dropout_p=dropout if module.training else 0.0, enable_gqa=groups > 1,
    )
    heads, dim = out.size(1), out.size(-1)
    out = out.transpose(1, 2).reshape(sequences * longest, heads * dim).index_select(0, real)
    return out.view(1, -1, heads, dim), None


AttentionInterface.register(NAME, varlen_sdpa)


def _configs(model: torch.nn.Module) -> list:
    """Every distinct config object the model's modules read `_attn_implementation` from."""
    seen: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen.setdefault(id(config), config)
    return list(seen.values())


def applies(model: torch.nn.Module) -> bool:
    """Whether the model's attention is one `varlen_sdpa` stands in for: plain causal self-attention
    of a decoder (sliding windows keep transformers' own path), and no gradient checkpointing, whose
    backward re-runs the layers after `packed_attention` has ended. Where it does not apply,
    transformers' own path still keeps packed sequences apart (a block mask from the position ids)."""
    configs = _configs(model)
    if checkpointing_on(model):
        return False
    return bool(configs) and all(
        c._attn_implementation in REPLACED and not getattr(c, "sliding_window", None) for c in configs
    )


def pays(model: torch.nn.Module) -> bool:
    """Whether a padding-free batch is faster than a padded one for this model: where `varlen_sdpa`
    applies or a flash kernel handles packed rows; not where transformers would fall back to a
    block-diagonal mask over the whole packed row (gradient checkpointing, sliding windows)."""
    configs = _configs(model)
    flash = bool(configs) and all(str(c._attn_implementation).startswith("flash_attention") for c in configs)
    return flash or applies(model)


@contextmanager
def packed_attention(model: torch.nn.Module, position_ids: torch.Tensor,
                     layout: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> Iterator[None]:
    """Run the model's attention as `varlen_sdpa` over the packed row with these position ids inside
    the block (a no-op where it does not apply).

    `layout`: (gather, real, longest) as `padding_index` gives them, for sequences that share tokens
    (alignctl/nn/prompt_groups.py: completions after one copy of their prompt); None: the sequences
    the position ids delimit."""
    if not applies(model):
        if layout is not None:  # transformers' own mask would let a completion see its siblings, or not its prompt
            raise ValueError("alignctl: sequences that share tokens (an explicit layout) need alignctl's attention, which this model "
                             "cannot run (gradient checkpointing, a flash kernel or a sliding window)")
        yield
        return
    configs = _configs(model)
    previous = [c._attn_implementation for c in configs]
    token = _layout.set(layout if layout is not None else padding_index(sequence_bounds(position_ids)))
    for c in configs:
        c._attn_implementation = NAME
    try:
        yield
    finally:
        for c, name in zip(configs, previous):
            c._attn_implementation = name
        _layout.reset(token)
