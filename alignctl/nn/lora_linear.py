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

Projections that read the same input (a layer's q|k|v, its MLP's gate|up; `group_projections` finds
them) run together as `GroupedLoraFunction` when all are on the plain path: the input is cast to the
autocast dtype once and saved once, and the input's gradient is summed into one tensor, where one
function per projection casts and saves the input once per projection and autograd adds as many float32
copies of its gradient. The results are the same numbers (tests/unit/test_lora_linear.py); SmolLM2's
reward-LoRA step takes 2-6 % less time (docs/performance.md, the fifth block).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear


class FusedLoraLinear(PeftLoraLinear):
    # The layers that read the same input as this one, itself included (`group_projections`); empty: none.
    input_group: tuple[FusedLoraLinear, ...] = ()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        operands = None if args or kwargs else self._fused_operands(x)
        if operands is not None:
            grouped = _grouped_output(self, x, operands)
            return grouped if grouped is not None else LoraLinearFunction.apply(x, *operands)
        if args or kwargs or self.disable_adapters or self.merged or not self._plain_adapters(x):
            return super().forward(x, *args, **kwargs)
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

    def _fused_operands(self, x: torch.Tensor) -> tuple | None:
        """(weight, bias, lora_A, lora_B, scaling) when a call on x would run as `LoraLinearFunction`, else None."""
        if self.disable_adapters or self.merged or not self._plain_adapters(x):
            return None
        single = self._single_fusable_adapter()
        if single is None:
            return None
        return self.base_layer.weight, self.base_layer.bias, self.lora_A[single].weight, self.lora_B[single].weight, self.scaling[single]

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
            out, a, b, low_rank = _adapted_projection(flat, weight, bias, lora_a, lora_b, scaling)
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
        with torch.autocast(grad.device.type, enabled=False):
            grad_x, grad_a, grad_b = _adapted_projection_backward(grad, flat, weight, a, b, low_rank, ctx.scaling, ctx.needs_input_grad[0],
                                                                  ctx.needs_input_grad[3], ctx.needs_input_grad[4])
            if grad_x is not None:
                grad_x = grad_x.view(ctx.input_shape).to(ctx.input_dtype)
        return grad_x, None, None, _in(grad_a, a_dtype), _in(grad_b, b_dtype), None


def _adapted_projection(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                        scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """flat W0^T + b + s (flat A^T) B^T for a (tokens, d_in) input already in the compute dtype: (out, A and
    B cast, the rank-r product in `LoraLinearFunction`'s orientation for that dtype)."""
    dtype = flat.dtype
    base, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
    out = torch.addmm(bias.to(dtype), flat, base.t()) if bias is not None else flat.mm(base.t())
    if dtype == torch.float32:
        low_rank = a.mm(flat.t())  # (r, tokens)
        out.addmm_(low_rank.t(), b.t(), alpha=scaling)
    else:
        low_rank = flat.mm(a.t())  # (tokens, r)
        out.addmm_(low_rank, b.t(), alpha=scaling)
    return out, a, b, low_rank


def _adapted_projection_backward(grad: torch.Tensor, flat: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                                 low_rank: torch.Tensor, scaling: float, needs_x: bool, needs_a: bool,
                                 needs_b: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The gradients of `_adapted_projection`'s flat input, A and B (None where not needed), all in the
    forward's compute dtype; the input's as (tokens, d_in)."""
    dtype = flat.dtype
    rank_first = dtype == torch.float32  # the forward's orientation: low_rank is (r, tokens), else (tokens, r)
    grad = grad.reshape(-1, grad.size(-1)).to(dtype)
    # d loss / d (x A^T), scaled: (r, tokens) or (tokens, r) as low_rank
    grad_low_rank = (b.t().mm(grad.t()) if rank_first else grad.mm(b)).mul_(scaling)
    grad_x = grad_a = grad_b = None
    if needs_x:
        grad_x = grad.mm(weight.to(dtype)).addmm_(grad_low_rank.t() if rank_first else grad_low_rank, a)
    if needs_a:
        grad_a = (grad_low_rank if rank_first else grad_low_rank.t()).mm(flat)
    if needs_b:
        grad_b = (low_rank if rank_first else low_rank.t()).mm(grad).mul_(scaling).t()
    return grad_x, grad_a, grad_b


def _in(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


PARTS = 4  # weight, bias, lora_A, lora_B: a projection's operands of `GroupedLoraFunction`


class GroupedLoraFunction(torch.autograd.Function):
    """Several adapted projections of one input x, each computed as `LoraLinearFunction` computes it
    (the same products, so the same numbers), with x cast and saved once; in backward the projections'
    input gradients are summed into one tensor of x's dtype, in the order autograd would add them.

    Arguments: x, the projections' scalings, then weight, bias, lora_A, lora_B for each projection.
    Returns one output per projection; an output the graph never uses gets no backward work."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scalings: tuple[float, ...], *operands: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        dtype = compute_dtype(x)
        outputs, saved = [], []
        with torch.autocast(x.device.type, enabled=False):
            flat = x.reshape(-1, x.size(-1)).to(dtype)
            for index, scaling in enumerate(scalings):
                weight, bias, lora_a, lora_b = operands[PARTS * index : PARTS * (index + 1)]
                out, a, b, low_rank = _adapted_projection(flat, weight, bias, lora_a, lora_b, scaling)
                outputs.append(out.view(*x.shape[:-1], out.size(-1)))
                saved += [weight, a, b, low_rank]
        ctx.save_for_backward(flat, *saved)
        ctx.scalings, ctx.input_shape, ctx.input_dtype = scalings, x.shape, x.dtype
        ctx.adapter_dtypes = [(operands[PARTS * i + 2].dtype, operands[PARTS * i + 3].dtype) for i in range(len(scalings))]
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: nothing to compute for it
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None):
        flat, *saved = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x, operand_grads = None, []
        with torch.autocast(flat.device.type, enabled=False):
            for index, grad in enumerate(grads):
                weight, a, b, low_rank = saved[PARTS * index : PARTS * (index + 1)]
                first = 2 + PARTS * index  # this projection's weight among forward's inputs
                if grad is None:
                    operand_grads += [None] * PARTS
                    continue
                part, grad_a, grad_b = _adapted_projection_backward(grad, flat, weight, a, b, low_rank, ctx.scalings[index], needs[0],
                                                                    needs[first + 2], needs[first + 3])
                if part is not None:
                    # The first part in x's dtype (a copy: the sum is written into it), the others added
                    # into it as they come: one tensor and one pass each, where per-projection functions
                    # would each cast theirs and autograd would add the copies.
                    grad_x = part.to(ctx.input_dtype) if grad_x is None else grad_x.add_(part)
                a_dtype, b_dtype = ctx.adapter_dtypes[index]
                operand_grads += [None, None, _in(grad_a, a_dtype), _in(grad_b, b_dtype)]
        return (None if grad_x is None else grad_x.view(ctx.input_shape)), None, *operand_grads


def group_projections(model: torch.nn.Module) -> int:
    """Mark the fused LoRA layers that read the same input: q|k|v of an attention, gate|up of an MLP
    (transformers' Llama-family names). Returns how many groups."""
    groups = 0
    for module in model.modules():
        for names in PROJECTION_GROUPS:
            members = tuple(getattr(module, name, None) for name in names)
            if all(type(m) is FusedLoraLinear for m in members) and len({m.in_features for m in members}) == 1:
                for member in members:
                    member.input_group = members
                groups += 1
    return groups


PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_MEMO = "_alignctl_grouped_projections"  # the attribute on x under which a group's other outputs wait
_separate = [False]


@contextmanager
def separate_projections() -> Iterator[None]:
    """Within the block each projection runs alone: for a caller that feeds a group's members different
    inputs (alignctl/nn/last_token.py), where computing the whole group for each input would be waste."""
    before, _separate[0] = _separate[0], True
    try:
        yield
    finally:
        _separate[0] = before


def _grouped_output(layer: FusedLoraLinear, x: torch.Tensor, operands: tuple) -> torch.Tensor | None:
    """`layer`'s output on x when its group runs as one `GroupedLoraFunction`, else None (`operands`:
    the layer's own `_fused_operands`).

    The first member called on x computes every member's output; the others wait on x (an attribute
    of the tensor, gone with it) until their own call takes them. A waiting output is taken only if x
    and the member's adapter weights are unchanged since (tensor versions) and autocast and grad mode
    are as they were; otherwise the group is computed again."""
    group = layer.input_group
    if len(group) < 2 or _separate[0] or x.is_inference():  # an inference tensor has no version to check
        return None
    state = (x._version, compute_dtype(x), torch.is_grad_enabled())
    waiting = getattr(x, _MEMO, None)
    if waiting is not None and waiting[0] is group and waiting[1] == state and layer in waiting[2]:
        output, versions = waiting[2].pop(layer)
        if versions == _adapter_versions(layer):
            return output
    every = [operands if member is layer else member._fused_operands(x) for member in group]
    if any(o is None for o in every):
        return None
    outputs = GroupedLoraFunction.apply(x, tuple(o[4] for o in every), *(t for o in every for t in o[:4]))
    setattr(x, _MEMO, (group, state, {m: (out, _adapter_versions(m)) for m, out in zip(group, outputs) if m is not layer}))
    return outputs[group.index(layer)]


def _adapter_versions(layer: FusedLoraLinear) -> tuple[tuple[str, int, int], ...]:
    """Which adapters are active and how often their weights were changed in place (an optimiser step)."""
    return tuple((name, layer.lora_A[name].weight._version, layer.lora_B[name].weight._version)
                 for name in layer.active_adapters if name in layer.lora_A)
