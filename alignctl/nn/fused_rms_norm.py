"""RMSNorm of Llama-family models as one autograd function: it keeps its input and one float per token.

transformers' RMSNorm computes ``weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype)`` with
``x32 = x.float()``, as separate ops: autograd keeps the float32 copy of the input (twice: for the
square and for the product), the normalised float32 rows and their cast, and its backward walks
those ops one by one. Two norms a layer, on every token: under bf16 that is several float32 (tokens x
hidden) tensors per norm kept until backward, and about ten elementwise passes forward and back.

`RMSNormFunction` computes the forward with the same ops in the same order, so its output is
bit-identical, and keeps only the input as it came (bf16 under an adapter's bf16 base) and the
reciprocal RMS, one float per token (which the model's own keeps too). Its backward recomputes the normalised rows and takes the
gradient in float32 in four passes: d x = rstd · (g' - x̂ · mean(g' · x̂)) with g' = g · weight, and
d weight = Σ g · x̂ when the weight trains (full fine-tuning). Liger-Kernel's LigerRMSNorm (Hsu et al.
2024) does the same in Triton. On SmolLM2's shapes (624 tokens, hidden 576, 2 cores) a norm's forward
and backward take 0.85 against 1.2 ms in bf16, 1.07 against 1.44 ms in float32; a LoRA step's saved
activations lose a float32 (tokens x hidden) tensor per norm.

``recipe.fused_rms_norm`` is the switch; `fuse_rms_norms` patches the trained model's norms in place.
Only the norm classes whose forward is that formula are patched (Llama, Mistral, Qwen2, Qwen3, whose
q/k norms are the same class); Gemma's (1 + weight) and every other norm keep their own forward.

A patched norm becomes an instance of a subclass whose forward is this one (`FusedLlamaRMSNorm` for
`LlamaRMSNorm`, and so on), not an instance attribute: transformers (with the `kernels` package, which it
requires) re-"kernelizes" its norm classes at every change of train/eval mode, and that drops an
instance's own forward in favour of its class's. The subclass keeps everything else of the class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def _normalised(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂ in float32, rstd): the model's own ops, in its order, so the forward matches bit for bit
    (float64 stays float64, where the model's own would round to float32: gradcheck's dtype)."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return x32 * rstd, rstd


class RMSNormFunction(torch.autograd.Function):
    """weight * normalise(x).to(x.dtype), saving x and the reciprocal RMS only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        normalised, rstd = _normalised(x, eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normalised.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        compute = rstd.dtype  # float32 (float64 for float64 inputs)
        normalised = x.to(compute) * rstd  # a new tensor: x itself may be float32
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # The forward multiplied the weight by x̂ cast to x's dtype: its gradient sees that rounding.
            rows = normalised.to(x.dtype).to(compute)
            grad_weight = (grad.to(compute) * rows).sum(tuple(range(grad.dim() - 1))).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            scaled = (grad * weight).to(compute)  # d loss / d x̂
            dot = (scaled * normalised).mean(-1, keepdim=True)
            grad_x = scaled.sub_(normalised.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


def _rms_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Without gradient there is nothing to save: the model's own ops, no autograd.Function overhead.
    if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
        return RMSNormFunction.apply(x, self.weight, self.variance_epsilon)
    normalised, _ = _normalised(x, self.variance_epsilon)
    return self.weight * normalised.to(x.dtype)


def is_rms_norm(module: nn.Module) -> bool:
    """One of the norm classes whose forward is weight * normalise(x).to(x.dtype) (not yet patched)."""
    return type(module).__name__ in RMS_NORM_CLASSES and isinstance(getattr(module, "weight", None), torch.Tensor) \
        and isinstance(getattr(module, "variance_epsilon", None), float)


_FUSED: dict[type, type] = {}  # norm class -> its fused subclass


def fused_class(cls: type) -> type:
    if cls not in _FUSED:
        _FUSED[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": _rms_norm_forward, "__module__": __name__,
                                                               "__doc__": f"{cls.__name__} through RMSNormFunction."})
    return _FUSED[cls]


def fuse_rms_norms(model: nn.Module) -> int:
    """Route every such RMSNorm of `model` through `RMSNormFunction`; returns how many were patched."""
    count = 0
    for module in model.modules():
        if is_rms_norm(module) and "forward" not in vars(module):
            module.__class__ = fused_class(type(module))
            count += 1
    return count
