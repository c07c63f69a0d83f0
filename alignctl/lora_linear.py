"""peft's LoRA linear layer with the low-rank update added in place, in one fused op.

peft computes ``result + lora_B(lora_A(dropout(x))) * scaling``: three (tokens x d_out) tensors per
adapted layer and step (B's output, its scaled copy, the sum) and as many elementwise passes over
them, forward and backward. On a small model that traffic costs as much as the rank-r matmuls
themselves. Here the update goes into the base layer's output with one ``addmm_`` (alpha =
scaling): no extra (tokens x d_out) tensor in the forward, none for the scaling in the backward.

Without dropout and with a frozen ``nn.Linear`` base (the usual LoRA case), the whole layer is one
autograd function, `LoraLinearFunction`: its backward is the five matmuls the gradients need (input,
A, B) with the scaling folded into the rank-r factors, where autograd through an in-place update of
the base output would first copy the whole (tokens x d_out) gradient for the base matmul's view
(``CopySlices``) and scale another one for B.

It is peft's class in every other respect (state dict keys, saving, merging, adapter switching), and
plugs in through peft's custom-module hook, so a saved adapter is a plain LoRA adapter. Anything off
the plain path (adapters disabled or merged, mixed-adapter batches, DoRA and other variants, a LoRA
bias, a dtype cast) goes to peft's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear


class FusedLoraLinear(PeftLoraLinear):
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or self.disable_adapters or self.merged or not self._plain_adapters(x):
            return super().forward(x, *args, **kwargs)
        single = self._single_fusable_adapter()
        if single is not None:
            base = self.base_layer
            return LoraLinearFunction.apply(x, base.weight, base.bias, self.lora_A[single].weight, self.lora_B[single].weight, self.scaling[single])
        result = self.base_layer(x)
        flat = result.view(-1, result.size(-1))  # F.linear's output: contiguous, and not saved for backward
        for name in self.active_adapters:
            if name in self.lora_A:
                low_rank = self.lora_A[name](self.lora_dropout[name](x))
                flat.addmm_(low_rank.view(-1, low_rank.size(-1)), self.lora_B[name].weight.t(), alpha=self.scaling[name])
        return result

    def _single_fusable_adapter(self) -> str | None:
        """The one active adapter when the layer can run as `LoraLinearFunction`: a plain, frozen
        ``nn.Linear`` base and no dropout (dropout's mask sits between x and A; that case keeps the
        in-place path below)."""
        names = [name for name in self.active_adapters if name in self.lora_A]
        base = self.base_layer
        if len(names) != 1 or type(base) is not torch.nn.Linear or base.weight.requires_grad:
            return None
        if base.bias is not None and base.bias.requires_grad:
            return None
        dropout = self.lora_dropout[names[0]]
        if not isinstance(dropout, torch.nn.Identity) and not (dropout.p == 0 or not self.training):
            return None
        return names[0]

    def _plain_adapters(self, x: torch.Tensor) -> bool:
        """Every active adapter is vanilla LoRA (no variant, no bias) in x's dtype."""
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            if name in self.lora_variant or self.lora_B[name].bias is not None or self.lora_A[name].weight.dtype != x.dtype:
                return False
        return True


class LoraLinearFunction(torch.autograd.Function):
    """x W0^T + b + s (x A^T) B^T with W0 and b frozen; saves x and the (r x tokens) A x^T only.

    The rank-r products are taken as (r x tokens) matrices, A x^T rather than x A^T: with one side
    only r = 8 wide, BLAS is 1.5-7x faster in that orientation on this CPU (measured per shape; the
    slowest, B's gradient g^T (x A^T), took longer than the layer's big matmul)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))
        out = torch.addmm(bias, flat, weight.t()) if bias is not None else flat.mm(weight.t())
        low_rank_t = lora_a.mm(flat.t())  # (r, tokens)
        out.addmm_(low_rank_t.t(), lora_b.t(), alpha=scaling)
        ctx.save_for_backward(flat, weight, lora_a, lora_b, low_rank_t)
        ctx.scaling, ctx.input_shape = scaling, x.shape
        return out.view(*x.shape[:-1], out.size(-1))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        flat, weight, lora_a, lora_b, low_rank_t = ctx.saved_tensors
        grad = grad.reshape(-1, grad.size(-1))
        grad_low_rank_t = lora_b.t().mm(grad.t()).mul_(ctx.scaling)  # d loss / d (A x^T), scaled: (r, tokens)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.mm(weight).addmm_(grad_low_rank_t.t(), lora_a).view(ctx.input_shape)
        if ctx.needs_input_grad[3]:
            grad_a = grad_low_rank_t.mm(flat)
        if ctx.needs_input_grad[4]:
            grad_b = low_rank_t.mm(grad).mul_(ctx.scaling).t()
        return grad_x, None, None, grad_a, grad_b, None
