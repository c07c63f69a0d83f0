"""A scalar head reads one position per row: run the top decoder layer for that position only.

A reward model's score is the head applied at each row's last non-padding token. Below the top
layer every position is needed (it feeds the keys and values of the positions above it), but the
top layer's output is read at that one position: its queries, attention, output projection and MLP
at every other position are thrown away. `top_layer_at_last_token` runs that layer for the read
position alone: the keys and values of the whole row (two small projections), then one query per
row attending to its prefix, then o_proj and the MLP for one token. On a 6-layer model that is
about a sixth of the forward and backward less, with the same score to float32 rounding. The reads
are (row, column) pairs (`Reads`): one per padded row (`padded_reads`), or several in one row of
sequences packed end to end, each attending to its own sequence only (`packed_reads`).

It is written for the Llama-style layer (pre-norm attention with rotary embeddings, then a pre-norm
MLP, each added to the residual): Llama, Mistral, Qwen2 and Qwen3 (with its q/k norms). Any other
model, a sliding window shorter than the rows, a flash backend, or gradient checkpointing (whose recompute in
backward would run outside this switch) keeps the model's own forward.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import rotate_half

from alignctl.nn import cpu_attention
from alignctl.nn.lora_linear import separate_projections
from alignctl.nn.model_parts import backbone, checkpointing_on

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
BACKENDS = ("sdpa", cpu_attention.NAME, "eager")
LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


def read_positions(input_ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """The position transformers' sequence classifiers pool at: each row's rightmost non-pad token (B,)."""
    if pad_id is None:
        return torch.full((input_ids.size(0),), input_ids.size(1) - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(input_ids.size(1), device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


def applies(model: torch.nn.Module, length: int) -> bool:
    """True when the model's top layer can run for one position of rows `length` long (see the module docstring)."""
    config = model.config
    if getattr(config, "model_type", None) not in FAMILIES or getattr(config, "_attn_implementation", None) not in BACKENDS:
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and length > window:
        return False
    if checkpointing_on(model):
        return False
    layers = getattr(backbone(model), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        return False
    top = layers[config.num_hidden_layers - 1]
    return all(hasattr(top, part) for part in LAYER_PARTS) and all(hasattr(top.self_attn, part) for part in ATTENTION_PARTS)


def _rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (B, heads, T, d) states with (B, T, d) cos/sin: transformers' formula for
    these families, applied to queries and keys at different positions (its own helper takes one set)."""
    return states * cos.unsqueeze(1) + rotate_half(states) * sin.unsqueeze(1)


def _heads(attention: torch.nn.Module, projection: str, norm: str | None, hidden: torch.Tensor) -> torch.Tensor:
    """(B, T, d_model) -> (B, heads, T, head_dim) through a projection and, where the model has it, a per-head norm."""
    states = getattr(attention, projection)(hidden)
    states = states.view(*hidden.shape[:-1], -1, attention.head_dim)
    if norm is not None and hasattr(attention, norm):  # Qwen3 normalises q and k per head before the rotary embedding
        states = getattr(attention, norm)(states)
    return states.transpose(1, 2)


def _one_position_forward(layer: torch.nn.Module, hidden_states: torch.Tensor, *_, position_embeddings=None,
                          reads: Reads, **__) -> torch.Tensor:
    """The decoder layer's output at the read positions, written into a copy of its input elsewhere."""
    rows, columns = reads.rows, reads.columns
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden_states)
    # (1, T, d) when every row has the same positions: one (rows, T, d) view to index rows from.
    cos, sin = (t.expand(hidden_states.size(0), -1, -1) for t in position_embeddings)
    with separate_projections():  # the query reads other rows than the keys and values: no q|k|v group
        query = _rotate(_heads(attention, "q_proj", "q_norm", normed[rows, columns].unsqueeze(1)), cos[rows, columns].unsqueeze(1),
                        sin[rows, columns].unsqueeze(1))
        key = _rotate(_heads(attention, "k_proj", "k_norm", normed), cos, sin)
        value = _heads(attention, "v_proj", None, normed)
    if key.size(0) != len(rows):  # one packed row, several reads: each read attends to that row
        key, value = key.expand(len(rows), -1, -1, -1), value.expand(len(rows), -1, -1, -1)
    dropout = getattr(attention, "attention_dropout", 0.0) if layer.training else 0.0
    attended = cpu_attention.sdpa(query, key, value, attn_mask=reads.visible[:, None, None, :], dropout_p=dropout,
                                  scale=attention.scaling, enable_gqa=key.size(1) != query.size(1))
    residual = hidden_states[rows, columns].unsqueeze(1) + attention.o_proj(attended.transpose(1, 2).reshape(len(rows), 1, -1))
    out = residual + layer.mlp(layer.post_attention_layernorm(residual))
    # Other positions keep the layer's input: finite, never read by the head, so their gradient is zero.
    return hidden_states.index_put((rows, columns), out.squeeze(1))


@dataclass
class Reads:
    """Where a scalar head reads: (row, column) pairs, and the keys each read attends to, (reads, T) boolean."""

    rows: torch.Tensor
    columns: torch.Tensor
    visible: torch.Tensor


def padded_reads(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_id: int | None) -> Reads:
    """One read a row, at `read_positions`, seeing the row's prefix less its padding."""
    batch, length = input_ids.shape
    columns = read_positions(input_ids, pad_id)
    visible = torch.arange(length, device=input_ids.device)[None, :] <= columns[:, None]
    if attention_mask is not None:
        visible = visible & attention_mask.bool()
    return Reads(torch.arange(batch, device=input_ids.device), columns, visible)


def packed_reads(columns: torch.Tensor, starts: torch.Tensor, length: int) -> Reads:
    """Reads of sequences packed end to end in one row: sequence i starts at starts[i] and is read at
    columns[i]; it sees its own tokens up to there."""
    positions = torch.arange(length, device=columns.device)[None, :]
    visible = (positions >= starts[:, None]) & (positions <= columns[:, None])
    return Reads(torch.zeros_like(columns), columns, visible)


@contextmanager
def top_layer_at(model: torch.nn.Module, reads: Reads) -> Iterator[bool]:
    """Within the block, the model's top decoder layer runs for `reads` only; yields whether it does
    (False: the model keeps its own forward). Only the read positions of the last hidden states are
    then meaningful: the others are the top layer's input, not its output."""
    if not applies(model, reads.visible.size(1)):
        yield False
        return
    layer = backbone(model).layers[model.config.num_hidden_layers - 1]
    # An instance attribute shadows the class's forward for this call only; nn.Module.__call__ (and
    # its hooks) still run around it.
    layer.forward = types.MethodType(
        lambda self, hidden_states, *args, **kwargs: _one_position_forward(self, hidden_states, *args, reads=reads, **kwargs),
        layer,
    )
    try:
        yield True
    finally:
        del layer.forward


def top_layer_at_last_token(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                            pad_id: int | None):
    """`top_layer_at` each row's read position (`read_positions`): the position transformers' sequence
    classifiers pool at."""
    return top_layer_at(model, padded_reads(input_ids, attention_mask, pad_id))
