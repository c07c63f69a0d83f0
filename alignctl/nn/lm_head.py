"""Log-probabilities of target tokens straight from hidden states, a chunk of positions at a time.

Once the vocabulary is large (32k to 256k ids) the (positions x vocab) float32 logits, the
log-softmax built from them and its gradient are the largest tensors of a training step. Here the
output projection and the log-prob gather run over `chunk` positions at a time, and backward
recomputes each chunk's logits instead of keeping them: memory holds one chunk of logits at most.
The numbers are those of logits -> log_softmax -> gather, up to float32 summation order.

``recipe.lm_head_chunk`` (positions per chunk; 0 turns this off) is the switch; `output_head` says
when the fused path applies (a plain bias-free Linear output layer on an unsharded model), else
callers take the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HeadOutputs:
    logps: torch.Tensor  # (N,) log p(target), differentiable
    entropy: torch.Tensor | None  # (N,) entropy of the next-token distribution, differentiable (an entropy bonus)
    correct: torch.Tensor | None  # (N,) bool: the target is the argmax, no gradient


def output_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's output projection if the fused path can stand in for it, else None.

    A LoRA on the output layer, a bias, or an FSDP-sharded weight (a DTensor) keep the plain path.
    Cheap enough for every forward: it looks at the output layer only, not at every module."""
    from torch.distributed.tensor import DTensor

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None or isinstance(head.weight, DTensor):
        return None
    return head


class _LinearLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, temperature: float, with_entropy: bool, with_argmax: bool):
        count = hidden.size(0)
        # The dtype autocast would multiply in (backward runs outside autocast, so it is kept for it).
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        cast_weight = weight.to(dtype)  # kept for backward: casting it again there costs as much as keeping it
        logps = torch.empty(count, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        entropy = torch.empty_like(logps) if with_entropy else None
        correct = torch.empty(count, dtype=torch.bool, device=hidden.device) if with_argmax else None
        for start in range(0, count, chunk):
            end = min(start + chunk, count)
            logits = _scaled((hidden[start:end].to(dtype) @ cast_weight.T).float(), temperature)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            logps[start:end] = logits.gather(-1, targets[start:end, None]).squeeze(-1) - chunk_lse
            lse[start:end] = chunk_lse
            if with_entropy:
                entropy[start:end] = chunk_lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
            if with_argmax:
                correct[start:end] = logits.argmax(-1) == targets[start:end]
        ctx.save_for_backward(hidden, cast_weight, targets, lse, entropy if with_entropy else lse.new_empty(0))
        ctx.chunk, ctx.temperature, ctx.dtype, ctx.weight_dtype = chunk, temperature, dtype, weight.dtype
        if correct is not None:
            ctx.mark_non_differentiable(correct)
        ctx.set_materialize_grads(False)  # an output the loss does not use (entropy as a metric) costs nothing in backward
        return logps, entropy, correct

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, _):
        hidden, cast_weight, targets, lse, entropy = ctx.saved_tensors
        # In the forward's matmul dtype (bf16 under autocast, as autocast runs a plain output layer's backward).
        dtype, count = ctx.dtype, hidden.size(0)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        for start in range(0, count, ctx.chunk):
            end = min(start + ctx.chunk, count)
            rows = hidden[start:end].to(dtype)
            logits = _scaled((rows @ cast_weight.T).float(), ctx.temperature)
            # In place wherever a (rows x vocab) float32 tensor is no longer needed: at a 49k vocabulary
            # each one is a pass over memory that costs as much as a small matmul.
            log_p = logits.sub_(lse[start:end, None])
            probs = log_p.exp()
            grad_logits = None
            if grad_entropy is not None:
                # H = -sum p log p: dH / d logits_j = -p_j (log p_j + H).
                grad_logits = log_p.add_(entropy[start:end, None]).mul_(probs).mul_(-grad_entropy[start:end, None].float())
            if grad_logps is not None:
                # d log p(y) / d logits = onehot(y) - softmax(logits), and logits = h W^T / temperature.
                upstream = grad_logps[start:end, None].float()
                term = probs.mul_(-upstream)
                grad_logits = term if grad_logits is None else grad_logits.add_(term)
                grad_logits.scatter_add_(-1, targets[start:end, None], upstream)
            if grad_logits is None:  # neither output reached the loss
                grad_logits = torch.zeros_like(probs)
            grad_logits = _scaled(grad_logits, ctx.temperature).to(dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits @ cast_weight
            if ctx.needs_input_grad[1]:
                part = grad_logits.T @ rows
                # Several chunks are summed in float32 (one chunk needs no sum).
                grad_weight = part if grad_weight is None and end == count else (part.float() if grad_weight is None else grad_weight.add_(part))
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _scaled(values: torch.Tensor, temperature: float) -> torch.Tensor:
    """values / temperature, in place, and no pass at all at temperature 1."""
    return values if temperature == 1.0 else values.div_(temperature)


def linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_argmax: bool = False,
) -> HeadOutputs:
    """log softmax(hidden @ weight.T / temperature)[target] per row, in float32, `chunk` rows at a time.

    Args:
        hidden: (N, d) final hidden states (after the model's last norm); weight: (V, d); targets: (N,).
        with_entropy / with_argmax: also return each row's entropy (differentiable) / whether its
            target is the argmax (no gradient).
    """
    logps, entropy, correct = _LinearLogps.apply(hidden, weight, targets, max(int(chunk), 1), float(temperature), with_entropy, with_argmax)
    return HeadOutputs(logps, entropy, correct)


def keep_last(input_ids: torch.Tensor, count: int) -> torch.Tensor:
    """`logits_to_keep` for the last `count` positions, as an index tensor rather than the int `count`.

    Why: with an int, transformers slices ``hidden[:, -count:]``, a strided view. torch's matmul does
    not fold a strided 3-D input that needs a gradient into one 2-D product; it runs a batched bmm
    against the (V, d) output weight expanded and copied once per row. On SmolLM2 (49k vocabulary) that
    copy alone took about 0.2 s of a 1 s training step. Indexing gives a contiguous (B, count, d) tensor,
    which folds into one mm. The logits are the same."""
    length = input_ids.size(1)
    return torch.arange(max(length - count, 0), length, device=input_ids.device)


def final_hidden(model: torch.nn.Module, **inputs) -> torch.Tensor:
    """The hidden states the output layer reads (after the final norm), with the projection itself
    computed for one position only."""
    keep = keep_last(inputs["input_ids"], 1)
    return model(**inputs, logits_to_keep=keep, use_cache=False, output_hidden_states=True).hidden_states[-1]
