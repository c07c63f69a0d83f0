"""The native rollout engine: a lean sampler for Llama-family decoders (Llama, Mistral, Qwen2).

Online RL spends most of a step sampling, and ``transformers.generate`` is built for generality:
per token it rebuilds masks, walks a cache object and runs each projection as its own kernel. On the
small batches of a rollout that bookkeeping, not arithmetic, sets the pace. This engine runs the same
mathematics with less of it:

- the weights are read once per rollout into fused matrices (q|k|v and gate|up: 4 matmuls a layer
  instead of 7); a LoRA or DoRA adapter is folded in (W + ΔW, never written back into the model);
- the KV cache is preallocated for prompt + max_new_tokens, so a step writes one column;
- each prompt is prefilled once, then its cache is repeated for its K completions;
- rows that have emitted EOS leave the batch (their cache rows are dropped), so the tail of a
  rollout runs only on the completions still going;
- for multi-turn episodes (`sample_resumed`), each row's cache can be kept when it leaves (a
  `RowCache`, its padding left out) and handed back next turn: only the tokens after it (the last
  sampled token and the environment's reply) are prefilled, the same tokens and log-probs as
  prefilling the whole episode again, within float rounding.

It computes the model's own rotary tables (``model.model.rotary_emb``, so every rope scaling the model
supports is right), and draws tokens with transformers' own logits warpers and an inverse-CDF draw (`draw`).
`unsupported_reason` says when it does not apply (another architecture, quantised or sharded weights,
a sliding window shorter than the sequence), and `engine_gap` compares its logits with the
model's own forward: ``rollout_engine=auto`` falls back to ``generate`` in all those cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from alignctl.nn.lm_head import keep_last

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
CHECK_TOLERANCE = 1e-3  # max |Δlogit| against the model's own forward, in float32
# Under autocast the model's own forward rounds to bf16/fp16 (SmolLM2 with LoRA, bf16: 0.8 at most over
# its vocabulary, 0.14 of its logits' standard deviation) and the engine does not round alike: it is
# checked to within this fraction of the logits' standard deviation, which an engine that computes
# another model (a missing norm, a wrong rotation) exceeds many times.
AUTOCAST_CHECK_FRACTION = 0.5


@dataclass
class Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # (q + k + v rows, hidden)
    qkv_bias: torch.Tensor | None
    out: torch.Tensor
    out_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # (2 * intermediate, hidden)
    down: torch.Tensor


@dataclass
class Weights:
    embed: torch.Tensor
    layers: list[Layer]
    norm: torch.Tensor
    head: torch.Tensor
    head_bias: torch.Tensor | None


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def unsupported_reason(model: nn.Module, total_length: int | None = None) -> str | None:
    """Why the native engine cannot sample from `model` (None: it can)."""
    lm = causal_lm(model)
    config = lm.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
        return "an MLP other than bias-free SwiGLU"
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and (config.model_type != "qwen2" or getattr(config, "use_sliding_window", False))
    if uses_window and (total_length is None or total_length > window):
        return f"a sliding attention window ({window} tokens) shorter than the sequence"
    for name, module in lm.named_modules():
        if name.endswith(("_proj", "lm_head")) and not _foldable(module):
            return f"{name} is a {type(module).__name__} (quantised, sharded or an adapter kind the engine does not fold)"
    if type(lm.get_input_embeddings()) is not nn.Embedding:
        return "an adapter on the input embeddings"
    return None


def _adapted(module: nn.Module) -> tuple[nn.Linear, list[str]] | None:
    """(base layer, names of the adapters to fold) of a peft LoRA/DoRA linear over a plain float weight;
    None when `module` is not one the engine can fold (a plain nn.Linear is handled by the caller)."""
    base = getattr(module, "base_layer", None)
    if type(base) is not nn.Linear or not hasattr(module, "lora_A") or _plain(base.weight) is None:
        return None
    if getattr(module, "disable_adapters", False):
        return (base, []) if not getattr(module, "merged_adapters", []) else None
    names = [name for name in module.active_adapters if name in module.lora_A and name not in module.merged_adapters]
    for name in names:
        if getattr(module, "lora_bias", {}).get(name, False) or getattr(module, "fan_in_fan_out", False):
            return None
    return base, names


def _foldable(module: nn.Module) -> bool:
    """Whether `_effective_linear` applies, without folding anything (a rollout asks every time)."""
    return (type(module) is nn.Linear and _plain(module.weight) is not None) or _adapted(module) is not None


def _effective_linear(module: nn.Module, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) that `module` applies in eval mode, adapters folded in, in `dtype` (None: as the
    fold gives it); None when it is not a plain or peft-LoRA/DoRA linear over a plain float weight.

    A LoRA is folded with one addmm, W + s·B·A, in `dtype`: under CPU autocast that is bf16 A and B, as
    autocast casts them in the model's own forward, with the sum accumulated in float32 and rounded once."""
    if type(module) is nn.Linear:
        weight = _plain(module.weight)
        return (None if weight is None else _in(weight, dtype)), _in(module.bias, dtype)
    adapted = _adapted(module)
    if adapted is None:
        return None
    base, names = adapted
    weight = base.weight
    if not names:
        return _in(weight, dtype), _in(base.bias, dtype)
    for name in names:
        if module.use_dora.get(name, False):  # W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, row-wise (peft's merge)
            delta = module.get_delta_weight(name)
            magnitude = module.lora_magnitude_vector[name]
            norm = magnitude.get_weight_norm(weight, delta, scaling=1)
            weight = (magnitude.weight / norm).view(-1, 1) * (weight + delta)
        else:
            fold = dtype or torch.promote_types(weight.dtype, module.lora_A[name].weight.dtype)
            weight = torch.addmm(weight.to(fold), module.lora_B[name].weight.to(fold), module.lora_A[name].weight.to(fold),
                                 alpha=module.scaling[name])
    return _in(weight, dtype), _in(base.bias, dtype)


def _in(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


def _plain(weight: torch.Tensor) -> torch.Tensor | None:
    return weight if type(weight) in (torch.Tensor, nn.Parameter) and weight.is_floating_point() else None


def _linear(module: nn.Module, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    found = _effective_linear(module, dtype)
    if found is None:
        raise ValueError(f"native rollout engine: cannot fold {type(module).__name__}")
    return found


def _fuse(modules: list[nn.Module], dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    pairs = [_linear(m, dtype) for m in modules]
    weight = torch.cat([w for w, _ in pairs])
    if all(b is None for _, b in pairs):
        return weight, None
    return weight, torch.cat([b if b is not None else w.new_zeros(w.size(0)) for w, b in pairs])


@torch.no_grad()
def read_weights(model: nn.Module, dtype: torch.dtype | None = None) -> Weights:
    """The model's current weights, fused and with adapters folded in (a copy where anything is folded),
    the matmul weights in `dtype` (None: as they are); the embedding and norms as they are."""
    lm = causal_lm(model)
    layers = []
    for block in lm.model.layers:
        attn, mlp = block.self_attn, block.mlp
        qkv, qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], dtype)
        out, out_bias = _linear(attn.o_proj, dtype)
        gate_up, gate_up_bias = _fuse([mlp.gate_proj, mlp.up_proj], dtype)
        down, down_bias = _linear(mlp.down_proj, dtype)
        assert gate_up_bias is None and down_bias is None, "unsupported_reason admits bias-free MLPs only"
        layers.append(Layer(block.input_layernorm.weight, qkv, qkv_bias, out, out_bias, block.post_attention_layernorm.weight, gate_up, down))
    head, head_bias = _linear(lm.lm_head, dtype)
    return Weights(lm.get_input_embeddings().weight, layers, lm.model.norm.weight, head, head_bias)


def decoding_precision(model: nn.Module, rows: int = 1) -> tuple[Weights, torch.dtype | None, torch.dtype | None]:
    """The weights the decoder runs on (for batches of about `rows` rows), the dtype its matmuls run in
    with autocast off (None: as the weights are, under whatever autocast is on), and the dtype of its
    residual stream (None: the embedding's). Without autocast: the weights as they are.

    On a CPU under autocast: the matmul weights folded in the autocast dtype; the residual stream, KV
    cache, attention and norms in float32, autocast off and each matmul's input cast by hand. A decode
    step multiplies a few rows by every weight, so it is bound by reading the weights: bf16 halves that
    (SmolLM2, 4 rows, 2 cores: the fused gate/up matmul 0.11 against 0.22 ms, the output layer 1.9
    against 3.6 ms), while the thin attention and elementwise work is faster in float32 there. The
    embedding stays as stored: only the rows a step looks up are cast (a float32 copy of SmolLM2's
    would be 113 MB a rollout). Where oneDNN multiplies bf16 natively, the matmul weights are reordered
    once for it (`_prepacked`). Elsewhere under autocast: the matmul weights folded in its dtype, the
    values autocast would give at every call."""
    device = model_device(model).type
    if not torch.is_autocast_enabled(device):
        return read_weights(model), None, None
    dtype = torch.get_autocast_dtype(device)
    if device == "cpu":
        weights = _norms_in(read_weights(model, dtype), torch.float32)
        return (_prepacked(weights, rows) if dtype == torch.bfloat16 and mkldnn_prepacking() else weights), dtype, torch.float32
    return read_weights(model, dtype), None, None


def mkldnn_prepacking() -> bool:
    """Whether this CPU build multiplies bf16 by weights reordered ahead of time (oneDNN, native bf16)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")
            and bool(ops._is_mkldnn_bf16_supported()))


def _prepacked(weights: Weights, rows: int) -> Weights:
    """The matmul weights reordered once into oneDNN's blocked layout. A plain bf16 matmul of a few rows
    reorders its weight on every call: SmolLM2, 4 rows, 2 cores, a decode step's matmuls take 15 ms
    instead of 22, for the same products bit for bit. A reordered weight is only an operand of `packed_linear`.

    `weights` is repacked in place, one matrix at a time, so that each folded copy is freed as soon as
    its reordered one exists: both sets at once would be another model's worth of memory at the peak
    (SmolLM2: 257 MiB more peak RSS in a GRPO run)."""
    def pack(weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows)

    for layer in weights.layers:
        for name in ("qkv", "out", "gate_up", "down"):
            setattr(layer, name, pack(getattr(layer, name)))
    weights.head = pack(weights.head)
    return weights


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a weight `_prepacked` reordered."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _is_prepacked(weights: Weights) -> bool:
    return weights.head.layout == torch._mkldnn


def _norms_in(weights: Weights, dtype: torch.dtype) -> Weights:
    layers = [Layer(layer.input_norm.to(dtype), layer.qkv, layer.qkv_bias, layer.out, layer.out_bias, layer.post_norm.to(dtype), layer.gate_up,
                    layer.down) for layer in weights.layers]
    return Weights(weights.embed, layers, weights.norm.to(dtype), weights.head, weights.head_bias)


class Decoder:
    """Forward passes over a preallocated KV cache: `prefill` the prompts, then `step` one token at a time."""

    def __init__(self, model: nn.Module, rows: int, capacity: int) -> None:
        lm = causal_lm(model)
        config = lm.config
        self.weights, self.matmul_dtype, self.stream_dtype = decoding_precision(model, rows)
        self.linear = packed_linear if _is_prepacked(self.weights) else F.linear
        self.rotary = lm.model.rotary_emb
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.dtype = self.stream_dtype or self.weights.embed.dtype  # residual stream, KV cache, attention
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.weights.embed.device) for _ in self.weights.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.weights.embed.device) for _ in self.weights.layers]
        self.length = 0  # cache columns filled

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Last-position logits of `input_ids` (rows, t) written after the cache's columns; key_mask
        (rows, 1, t, length + t), boolean or additive, says which cached and new keys each query sees
        (None: all, causally). Sampling only: no gradient."""
        if self.matmul_dtype is not None:
            with torch.autocast("cpu", enabled=False):
                return self._forward(input_ids, positions, key_mask)
        return self._forward(input_ids, positions, key_mask)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        # A decode step is a few rows through every layer: the matmuls read the weights, and the rest is
        # one small kernel per op. So casts are folded into the ops that need them (a norm writes the
        # matmul dtype, a matmul's output joins the float32 stream by type promotion) and the rotation is
        # three ops, not six.
        w, (rows, t) = self.weights, input_ids.shape
        x = F.embedding(input_ids, w.embed)
        if self.stream_dtype is not None:
            x = x.to(self.stream_dtype)
        cos, sin = self.rotary(x, positions)
        cos, sin = cos.unsqueeze(1), _signed_sin(sin.unsqueeze(1))
        start, end = self.length, self.length + t
        for layer, keys, values in zip(w.layers, self.keys, self.values):
            qkv = self.linear(self._norm(x, layer.input_norm), layer.qkv, layer.qkv_bias)
            qkv = qkv.view(rows, t, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
            query_key, v = qkv.split([self.heads + self.kv_heads, self.kv_heads], dim=1)
            q, k = _rotate(query_key, cos, sin).split([self.heads, self.kv_heads], dim=1)  # one rotation for both
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            attended = F.scaled_dot_product_attention(
                q, keys[:, :, :end], values[:, :, :end], attn_mask=key_mask,
                is_causal=key_mask is None and t > 1 and start == 0, enable_gqa=self.kv_heads != self.heads,
            )
            attended = attended.transpose(1, 2).reshape(rows, t, -1).to(self.compute_dtype(x))
            x = x + self.linear(attended, layer.out, layer.out_bias)
            gate, up = self.linear(self._norm(x, layer.post_norm), layer.gate_up).chunk(2, dim=-1)
            x = x + self.linear(F.silu(gate) * up, layer.down)
        self.length = end
        return self.linear(self._norm(x[:, -1], w.norm), w.head, w.head_bias).float()

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return self.matmul_dtype or x.dtype

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm computed in float32 (as the model's own), written in the matmul dtype."""
        x32 = x.float()
        rstd = x32.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return torch.mul(x32 * rstd, weight, out=torch.empty(x.shape, dtype=self.compute_dtype(x), device=x.device))

    def repeat_rows(self, copies: int) -> None:
        self.keys = [k.repeat_interleave(copies, dim=0) for k in self.keys]
        self.values = [v.repeat_interleave(copies, dim=0) for v in self.values]

    def keep_rows(self, index: torch.Tensor) -> None:
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) · sin = roll(x, half) · signed sin."""
    half = sin.size(-1) // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, x · cos + rotate_half(x) · sin, where rotate_half(x) = (-x₂, x₁) = roll(x, half) with
    its first half negated (folded into `signed_sin`)."""
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, -1), signed_sin)


def warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """transformers' own sampling warpers, in generate's order (those that would do nothing left out)."""
    chosen = LogitsProcessorList()
    if temperature != 1.0:
        chosen.append(TemperatureLogitsWarper(temperature))
    if top_k:
        chosen.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        chosen.append(TopPLogitsWarper(top_p))
    return chosen


def prompt_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(rows, 1, W, W) boolean: causal, padding keys hidden; a padding query sees itself (no empty row, so no NaN)."""
    width = attention_mask.size(1)
    causal = torch.ones(width, width, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal & attention_mask.bool()[:, None, :]
    return (allowed | torch.eye(width, dtype=torch.bool, device=attention_mask.device)).unsqueeze(1)


@torch.no_grad()
def sample(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, copies: int, temperature: float, top_k: int, top_p: float,
    max_new_tokens: int, eos_id: int, pad_id: int, with_logps: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(prompts x copies, max_new_tokens) sampled tokens for left-padded prompts, the `copies` of a prompt
    consecutive; after a row's EOS come pad tokens (what generate returns). `with_logps`: also the
    sampler's log-prob of each sampled token under the distribution it was drawn from (after the
    warpers; 0 after a row's end)."""
    prompts, width = input_ids.shape
    rows = prompts * copies
    decoder = Decoder(model, prompts, width + max_new_tokens)
    padded = not bool(attention_mask.all())
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = decoder.forward(input_ids, positions, prompt_mask(attention_mask) if padded else None)
    decoder.repeat_rows(copies)
    logits = logits.repeat_interleave(copies, dim=0)
    next_position = positions[:, -1].repeat_interleave(copies) + 1
    # Padding keys as an additive bias (-inf), which sdpa takes a little faster than a boolean mask.
    key_bias = torch.zeros(rows, width + max_new_tokens, dtype=decoder.dtype, device=input_ids.device)
    key_bias[:, :width].masked_fill_(~attention_mask.bool().repeat_interleave(copies, dim=0), float("-inf"))
    tokens, logps, _ = _decode(decoder, logits, next_position, key_bias if padded else None, warpers(temperature, top_k, top_p), max_new_tokens,
                               eos_id, pad_id, keep_caches=False)
    return (tokens, logps) if with_logps else tokens


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token a row from (rows, vocab) probabilities, by inverting each row's cumulative distribution
    at a uniform draw: an exact sampler (a zero-probability token is never drawn). torch.multinomial
    draws an exponential variate per vocabulary entry instead, 4.1 ms a step for 4 rows of SmolLM2's
    49k vocabulary on 2 CPU cores against 0.07 ms here: a tenth of a GRPO rollout. The cumulative sum is
    taken in float64 so that rounding cannot move mass between tokens."""
    cumulative = probs.double().cumsum(-1)
    uniform = torch.rand(probs.size(0), 1, dtype=torch.float64, device=probs.device) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, uniform, right=True).clamp_(max=probs.size(-1) - 1).squeeze(1)


def _decode(decoder: Decoder, logits: torch.Tensor, next_position: torch.Tensor, key_bias: torch.Tensor | None, warp: LogitsProcessorList,
            max_new_tokens: int, eos_id: int, pad_id: int, keep_caches: bool) -> tuple[torch.Tensor, torch.Tensor, dict[int, RowCache]]:
    """Sample up to `max_new_tokens` a row from the prefilled `decoder` and its last-position `logits`:
    (rows, max_new_tokens) tokens (pad after a row's EOS), their sampler log-probs, and, with
    `keep_caches`, each row's cache as it leaves the batch (all but its last sampled token, which was
    never fed). `key_bias` (rows, capacity): -inf at padding keys (None: no padding)."""
    rows, device = logits.size(0), logits.device
    out = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logps = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device)
    live = torch.arange(rows, device=device)  # original row of each row still in the batch
    caches: dict[int, RowCache] = {}
    empty = out.new_empty(0)
    for step in range(max_new_tokens):
        warped = warp(empty, logits)
        probs = torch.softmax(warped, dim=-1)
        tokens = draw(probs)
        out[live, step] = tokens
        out_logps[live, step] = torch.log_softmax(warped, dim=-1).gather(1, tokens[:, None]).squeeze(1)
        if step == max_new_tokens - 1:
            break
        going = tokens != eos_id
        if not bool(going.all()):  # finished rows leave the batch, and their cache rows with them
            if keep_caches:
                caches |= _row_caches(decoder, (~going).nonzero().squeeze(1), live, key_bias)
            keep = going.nonzero().squeeze(1)
            live, tokens, next_position = live[keep], tokens[keep], next_position[keep]
            key_bias = key_bias[keep] if key_bias is not None else None
            if not len(keep):
                break
            decoder.keep_rows(keep)
        end = decoder.length + 1
        mask = key_bias[:, None, None, :end] if key_bias is not None else None
        logits = decoder.forward(tokens[:, None], next_position[:, None], mask)
        next_position = next_position + 1
    if keep_caches:
        caches |= _row_caches(decoder, torch.arange(len(live), device=device), live, key_bias)
    return out, out_logps, caches


@dataclass
class RowCache:
    """One sequence's keys and values in every layer, without padding: (kv heads, length, head dim) each.
    It holds the sequence's first `length` tokens, at positions 0 .. length - 1."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].size(1)


def _row_caches(decoder: Decoder, local: torch.Tensor, live: torch.Tensor, key_bias: torch.Tensor | None) -> dict[int, RowCache]:
    """The caches of batch rows `local` (original rows live[local]), their padding columns left out: a
    copy, so the batch's cache can be freed."""
    found = {}
    for row in local.tolist():
        columns = torch.arange(decoder.length, device=live.device)
        if key_bias is not None:
            columns = (key_bias[row, : decoder.length] == 0).nonzero().squeeze(1)
        found[int(live[row])] = RowCache([k[row].index_select(1, columns) for k in decoder.keys],
                                         [v[row].index_select(1, columns) for v in decoder.values])
    return found


@torch.no_grad()
def sample_resumed(
    model: nn.Module, caches: Sequence[RowCache | None], new_ids: Sequence[list[int]], copies: int, temperature: float, top_k: int,
    top_p: float, max_new_tokens: int, eos_id: int, pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, list[RowCache]]:
    """`sample` for sequences that go on from a kept cache: row r is its cache's tokens (None: none yet)
    followed by new_ids[r], of which only the new ones are prefilled. Returns the sampled tokens, their
    sampler log-probs (as `sample`) and each of the rows x copies sequences' cache, every token but
    the last sampled one (the next call's first new id).

    The batch puts each row's cache right-aligned before a shared column C (the longest cache) and its
    new ids left-padded after it, so the new ids of every row are written in the same columns."""
    device = model_device(model)
    rows, cached = len(new_ids), [cache.length if cache is not None else 0 for cache in caches]
    width, fresh = max(cached), max(map(len, new_ids))
    capacity = width + fresh + max_new_tokens
    decoder = Decoder(model, rows, capacity)
    valid = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
    for row, (cache, length, ids) in enumerate(zip(caches, cached, new_ids)):
        if cache is not None:
            for keys, values, kept_keys, kept_values in zip(decoder.keys, decoder.values, cache.keys, cache.values):
                keys[row, :, width - length : width] = kept_keys
                values[row, :, width - length : width] = kept_values
        valid[row, width - length : width] = True
        valid[row, width + fresh - len(ids) : width + fresh] = True
    decoder.length = width
    input_ids = torch.tensor([[pad_id] * (fresh - len(ids)) + list(ids) for ids in new_ids], dtype=torch.long, device=device)
    lengths = torch.tensor([len(ids) for ids in new_ids], device=device)
    positions = (torch.arange(fresh, device=device) - (fresh - lengths)[:, None] + torch.tensor(cached, device=device)[:, None]).clamp(min=0)
    logits = decoder.forward(input_ids, positions, resumed_mask(valid[:, : width + fresh], width))
    decoder.repeat_rows(copies)
    key_bias = torch.zeros(rows, capacity, dtype=decoder.dtype, device=device).masked_fill_(~valid, float("-inf"))
    key_bias[:, width + fresh :] = 0  # the sampled tokens' columns
    tokens, logps, kept = _decode(decoder, logits.repeat_interleave(copies, dim=0), positions[:, -1].repeat_interleave(copies) + 1,
                                  key_bias.repeat_interleave(copies, dim=0), warpers(temperature, top_k, top_p), max_new_tokens, eos_id, pad_id,
                                  keep_caches=True)
    return tokens, logps, [kept[row] for row in range(rows * copies)]


def resumed_mask(valid: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, 1, t, width + t) boolean for new ids written after `width` cached columns: every valid cached
    key, the new ones causally; a padding query sees itself (no empty row, so no NaN). With width 0
    it is `prompt_mask`."""
    rows, total = valid.shape
    t = total - width
    seen = torch.ones(t, total, dtype=torch.bool, device=valid.device).tril(diagonal=width)
    itself = torch.zeros(t, total, dtype=torch.bool, device=valid.device)
    itself[:, width:] = torch.eye(t, dtype=torch.bool, device=valid.device)
    return ((seen & valid[:, None, :]) | itself).unsqueeze(1)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def engine_gap(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[float, float]:
    """Max |Δ| between the engine's last-position logits and the model's own forward on the same
    left-padded prompts (the guard that the engine computes the model it was given), and how far it
    may go: CHECK_TOLERANCE in full precision; under autocast, AUTOCAST_CHECK_FRACTION of the spread
    of the model's own logits."""
    decoder = Decoder(model, input_ids.size(0), input_ids.size(1))
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    padded = not bool(attention_mask.all())
    ours = decoder.forward(input_ids, positions, prompt_mask(attention_mask) if padded else None)
    theirs = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, logits_to_keep=keep_last(input_ids, 1)).logits[:, -1].float()
    tolerance = CHECK_TOLERANCE
    if torch.is_autocast_enabled(model_device(model).type):
        tolerance = max(CHECK_TOLERANCE, AUTOCAST_CHECK_FRACTION * float(theirs.std()))
    return float((ours - theirs).abs().max()), tolerance

