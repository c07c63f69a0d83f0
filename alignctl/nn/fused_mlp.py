"""The SwiGLU feed-forward of Llama-family models, keeping two activations for backward instead of three.

A Llama/Mistral/Qwen MLP computes ``down(silu(gate(x)) * up(x))``. Written as PyTorch ops, autograd keeps
``gate(x)`` (for silu's backward), ``silu(gate(x))`` and ``up(x)`` (for the product's), then
``down`` keeps the product: four (tokens x intermediate) tensors a layer, and the intermediate size
is 2.7-4x the hidden size, so they are most of a decoder's saved activations. `SiluMul` keeps only
``gate(x)`` and ``up(x)`` and recomputes ``silu`` in backward, an elementwise pass that costs far less
than the memory it frees (Liger-Kernel's LigerSiLUMulFunction, Hsu et al. 2024, does the same in Triton).

The forward is the same arithmetic as the module's own, so outputs are bit-identical; gradients agree
to float rounding (tests/unit/test_fused_mlp.py). ``recipe.fused_mlp`` is the switch; `fuse_swiglu`
patches the trained model's MLPs in place (adapters on their projections keep working: the
projections are still called as modules).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving (gate, up) only."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        # aten's silu_backward is one vectorised pass for grad * d silu(g)/dg = grad * sigmoid(g) * (1 + g *
        # (1 - sigmoid(g))), the kernel autograd itself uses for F.silu; written as separate tensor ops,
        # the same formula takes nine passes and nine temporaries (5x slower on a 2-core CPU).
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        grad_up = F.silu(gate).mul_(grad)
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # Without gradient there is nothing to save: the plain ops, no autograd.Function overhead.
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SiluMul.apply(gate, up)
    return F.silu(gate) * up


def _swiglu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


SILU_CLASSES = ("SiLU", "SiLUActivation")  # torch's, and transformers' ACT2FN["silu"] (both plain F.silu)


def is_swiglu(module: nn.Module) -> bool:
    """A gate/up/down MLP with SiLU (transformers' Llama, Mistral, Qwen2/3, ... MLP classes)."""
    act = getattr(module, "act_fn", None)
    return (
        type(module).__name__.endswith("MLP")
        and all(isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj"))
        and type(act).__name__ in SILU_CLASSES
    )


def fuse_swiglu(model: nn.Module) -> int:
    """Route every SwiGLU MLP of `model` through `silu_mul`; returns how many were patched."""
    count = 0
    for module in model.modules():
        if is_swiglu(module) and "forward" not in vars(module):
            module.forward = types.MethodType(_swiglu_forward, module)
            count += 1
    return count
