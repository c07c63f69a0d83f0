"""The memory model behind `alignctl plan`: what one training step keeps alive, and what the process
adds around it on a CPU.

Saved activations, per token and decoder layer (Llama family: hidden h, key/value width kv,
MLP width I; c = bytes of the compute dtype, 2 under 16-bit autocast):
- each RMSNorm keeps its input upcast to float32 (4h, twice a layer), and with the norms trained
  (full fine-tuning) their normalised output as well (c*h, twice); with `recipe.fused_rms_norm`
  (alignctl/nn/fused_rms_norm.py) only its input as it comes (the residual stream: c*h where the weights
  are stored in the compute dtype, 4h where they are float32 or 4-bit); both keep one float a token
  more (not counted);
- the linear layers keep their inputs: one shared copy for q|k|v, one for gate|up, plus o_proj's and
  down_proj's inputs (c*(3h + I)) when the weights are stored in the compute dtype; float32 weights
  under 16-bit autocast cast the input once per layer called (c*(6h + I)), and so do the float32
  adapters over a 4-bit base; a 4-bit model keeps two float32 (tokens x h) tensors a layer more
  (counted with torch's saved-tensor hooks on SmolLM2: bitsandbytes' matmul keeps only its 4-bit weight);
- scaled-dot-product attention keeps q, k, v (k and v at the full query width once repeated for
  grouped heads) and its output (4*c*h), with no (s x s) scores: its kernels (flash or
  memory-efficient) recompute them; on CPU under bf16 (alignctl/nn/cpu_attention.py) k and v are kept
  at their own width, c*(2h + 2kv), which this overestimates by 2c(h - kv);
- the SwiGLU MLP keeps gate(x) and up(x) (alignctl/nn/fused_mlp.py; silu(gate(x)) too without it), and
  down_proj's input is counted above.
Korthikanti et al. (2022) count the same kind of terms for GPT layers; Llama has no dropout masks and
its attention kernels keep no scores, which is why their 34 + 5as/h bytes overestimated it.
With gradient checkpointing a layer keeps only its input (c*h, float32 for 4-bit models) and one
layer at a time is whole again. The output layer: with `recipe.lm_head_chunk` one chunk of float32
logits, their exponentials and their gradient (3 x chunk x vocab x 4); without it the whole float32
logits and their gradient.

Around the step, per trained model: foreach AdamW allocates one temporary the size of the trainable
parameters in its step, while the gradients are whole; float32 weights under 16-bit autocast are
cast once per forward and the 16-bit copies stay saved for backward (2 bytes a linear weight).

On a CPU the resident set also holds the process itself (Python, torch, transformers, datasets:
measured here, as `plan` has imported them) and, while a model loads with a dtype change, the whole
file mapped beside the converted weights; a model whose weights load in the file's own dtype keeps
the file mapped, so every page the load read stays resident (a 4-bit base loaded from a float32 file
with a float32 compute dtype: the float32 linear weights stay resident beside their 4-bit copies).
Under glibc's malloc (no jemalloc or tcmalloc installed, alignctl/core/allocator.py) the heaps keep what a
step frees in holes the next step cannot all reuse: on SmolLM2 the resident set between steps grew by
about one step's activations within 3 steps (LoRA SFT: +300 MiB over 834 MiB of live memory), so the
CPU peak counts the activations once more there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shapes:
    hidden: int
    kv: int  # key/value width before grouped heads are repeated
    intermediate: int
    layers: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> Shapes:
        hidden = config.hidden_size
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
        intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
        return cls(hidden, kv, intermediate, config.num_hidden_layers, config.vocab_size)


@dataclass(frozen=True)
class Precision:
    compute: int  # bytes of a matmul's output: 2 under 16-bit autocast, else the weights' own
    casts_inputs: bool  # float32 weights under 16-bit autocast: each linear casts its input
    four_bit: bool  # a 4-bit base (QLoRA): its float32 residual stream keeps more
    norms_trained: bool  # full fine-tuning: the norms' outputs are saved for their weight's gradient


def layer_bytes_per_token(s: Shapes, p: Precision, fused_mlp: bool, fused_norm: bool = False) -> float:
    """Bytes one decoder layer keeps for backward per token (see the module docstring)."""
    h, c, inter = s.hidden, p.compute, s.intermediate
    if fused_norm:
        stream = 4 if (p.casts_inputs or p.four_bit) else c
        norms = 2 * stream * h
    else:
        norms = 2 * 4 * h + (2 * c * h if p.norms_trained else 0)
    inputs = c * ((6 if p.casts_inputs else 3) * h + inter) + (2 * 4 * h if p.four_bit else 0)
    attention = 4 * c * h
    mlp = (2 if fused_mlp else 3) * c * inter
    return norms + inputs + attention + mlp


def activation_bytes(rows: int, width: int, positions: int, s: Shapes, p: Precision, fused_mlp: bool,
                     head_chunk: int, checkpointing: bool, fused_norm: bool = False) -> float:
    """Activations of one micro-batch of `rows` x `width` tokens, `positions` of which reach the output layer."""
    tokens = rows * width
    layer = layer_bytes_per_token(s, p, fused_mlp, fused_norm) * tokens
    if checkpointing:
        stack = s.layers * tokens * s.hidden * (4 if p.four_bit else p.compute) + layer
    else:
        stack = s.layers * layer
    logits = 3 * min(head_chunk, positions) * s.vocab * 4 if head_chunk else 2 * tokens * s.vocab * 4
    return stack + logits


def file_dtype_bytes(config: Any) -> int:
    """Bytes a value of the checkpoint as stored (its config's dtype; float32 when it names none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return DTYPE_BYTES.get(str(dtype).removeprefix("torch."), 4)


def process_bytes() -> float:
    """The resident set of a process that has imported what a training run imports (this one, once
    `plan` has done so); 0 where /proc cannot be read."""
    import datasets  # noqa: F401  (a run holds all four)
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0.0
    line = next((entry for entry in status.splitlines() if entry.startswith("VmRSS:")), None)
    return float(line.split()[1]) * 1024 if line else 0.0
