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
bias, a dtype cast without autocast) goes to peft's own forward. Under autocast the fused layer runs its
matmuls in the autocast dtype, as peft's layer does under autocast, with the adapters kept float32.
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
                # In-place ops are not autocast: under autocast the base output and A's output are in
                # the autocast dtype while B's float32 weight is not, so B is cast here.
                lora_b = self.lora_B[name].weight.to(flat.dtype)
                flat.addmm_(low_rank.view(-1, low_rank.size(-1)).to(flat.dtype), lora_b.t(), alpha=self.scaling[name])
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
        """Every active adapter is vanilla LoRA (no variant, no bias), and no dtype cast is left to
        peft: under autocast every matmul runs in the autocast dtype whatever the adapters' dtype;
        without it, the adapters must be in x's dtype (peft casts x to them otherwise)."""
        autocast = torch.is_autocast_enabled(x.device.type)
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            if name in self.lora_variant or self.lora_B[name].bias is not None:
                return False
            if not autocast and self.lora_A[name].weight.dtype != x.dtype:
                return False
        return True


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in here: autocast's where it is on, x's own otherwise."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class LoraLinearFunction(torch.autograd.Function):
    """x W0^T + b + s (x A^T) B^T with W0 and b frozen; saves x, the rank-r product x A^T and the weights
    (no (tokens x d_out) tensor).

    With one side only r = 8 wide, BLAS speed depends on which way round the rank-r products are
    taken, and not the same way per dtype on this CPU (measured per shape). In float32 they are taken
    as (r x tokens) matrices, A x^T: 1.5-7x faster at the tiny model's widths (the slowest, B's gradient
    g^T (x A^T), had taken longer than the layer's big matmul). In bf16, as (tokens x r), x A^T: the
    five products and two in-place updates of a SmolLM2 layer at 624 tokens take 17-30 % less time."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        # Under autocast the five matmuls run in the autocast dtype, as autocast would run them one by
        # one (the adapters stay float32 parameters, cast per step); autocast itself is turned off
        # inside, because it does not cast the in-place addmm_. Without autocast every .to() is a no-op.
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            flat = x.reshape(-1, x.size(-1)).to(dtype)
            base, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            out = torch.addmm(bias.to(dtype), flat, base.t()) if bias is not None else flat.mm(base.t())
            if dtype == torch.float32:
                low_rank = a.mm(flat.t())  # (r, tokens)
                out.addmm_(low_rank.t(), b.t(), alpha=scaling)
            else:
                low_rank = flat.mm(a.t())  # (tokens, r)
                out.addmm_(low_rank, b.t(), alpha=scaling)
        # The base weight is saved as it is and cast again in backward: a cast copy of the frozen base
        # would be one more (d_out x d_in) tensor held per layer until backward. The rank-r factors are
        # saved cast (a few KB): casting them again would be two more small ops per layer and step.
        ctx.save_for_backward(flat, weight, a, b, low_rank)
        ctx.scaling, ctx.input_shape, ctx.input_dtype = scaling, x.shape, x.dtype
        ctx.adapter_dtypes = lora_a.dtype, lora_b.dtype
        return out.view(*x.shape[:-1], out.size(-1))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        flat, weight, a, b, low_rank = ctx.saved_tensors
        a_dtype, b_dtype = ctx.adapter_dtypes
        dtype = flat.dtype  # the forward's compute dtype
        rank_first = dtype == torch.float32  # the forward's orientation: low_rank is (r, tokens), else (tokens, r)
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.reshape(-1, grad.size(-1)).to(dtype)
            # d loss / d (x A^T), scaled: (r, tokens) or (tokens, r) as low_rank
            grad_low_rank = (b.t().mm(grad.t()) if rank_first else grad.mm(b)).mul_(ctx.scaling)
            grad_x = grad_a = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = grad.mm(weight.to(dtype)).addmm_(grad_low_rank.t() if rank_first else grad_low_rank, a)
                grad_x = grad_x.view(ctx.input_shape).to(ctx.input_dtype)
            if ctx.needs_input_grad[3]:
                grad_a = (grad_low_rank if rank_first else grad_low_rank.t()).mm(flat).to(a_dtype)
            if ctx.needs_input_grad[4]:
                grad_b = (low_rank if rank_first else low_rank.t()).mm(grad).mul_(ctx.scaling).t().to(b_dtype)
        return grad_x, None, None, grad_a, grad_b, None
