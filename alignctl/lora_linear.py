"""peft's LoRA linear layer with the low-rank update added in place, in one fused op.

peft computes ``result + lora_B(lora_A(dropout(x))) * scaling``: three (tokens x d_out) tensors per
adapted layer and step (B's output, its scaled copy, the sum) and as many elementwise passes over
them, forward and backward. On a small model that traffic costs as much as the rank-r matmuls
themselves. Here the update goes into the base layer's output with one ``addmm_`` (alpha =
scaling): no extra (tokens x d_out) tensor in the forward, none for the scaling in the backward.

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
        result = self.base_layer(x)
        flat = result.view(-1, result.size(-1))  # F.linear's output: contiguous, and not saved for backward
        for name in self.active_adapters:
            if name in self.lora_A:
                low_rank = self.lora_A[name](self.lora_dropout[name](x))
                flat.addmm_(low_rank.view(-1, low_rank.size(-1)), self.lora_B[name].weight.t(), alpha=self.scaling[name])
        return result

    def _plain_adapters(self, x: torch.Tensor) -> bool:
        """Every active adapter is vanilla LoRA (no variant, no bias) in x's dtype."""
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            if name in self.lora_variant or self.lora_B[name].bias is not None or self.lora_A[name].weight.dtype != x.dtype:
                return False
        return True
