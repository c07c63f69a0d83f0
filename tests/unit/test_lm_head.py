"""alignctl.nn.lm_head: the chunked output layer gives the plain path's log-probs, entropies, argmax and
gradients (recipe.lm_head_chunk > 0 against 0), on raw tensors and through the real model paths."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignctl.nn.lm_head import linear_logps, output_head
from alignctl.nn.logprobs import left_padded_batch, response_token_logps
from alignctl.nn.losses import IGNORE, sft_loss, sft_loss_from_hidden

TOL = 1e-5


def plain(hidden, weight, targets, temperature):
    logits = (hidden @ weight.T).float() / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    return log_probs.gather(-1, targets[:, None]).squeeze(-1), -(log_probs.exp() * log_probs).sum(-1), logits.argmax(-1) == targets


@pytest.mark.parametrize("chunk", [1, 3, 7, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_log_probs_and_gradients_equal_the_plain_path(chunk, temperature):
    torch.manual_seed(0)
    hidden = torch.randn(7, 16, requires_grad=True)
    weight = (3 * torch.randn(500, 16)).requires_grad_()  # sharp enough that a wrong row or column shows
    targets = torch.randint(0, 500, (7,))
    upstream = torch.randn(7)  # an arbitrary upstream gradient, not just ones

    expected, entropy, argmax = plain(hidden, weight, targets, temperature)
    grad_h, grad_w = torch.autograd.grad((expected * upstream).sum(), [hidden, weight])
    out = linear_logps(hidden, weight, targets, chunk, temperature, with_entropy=True, with_argmax=True)
    got_h, got_w = torch.autograd.grad((out.logps * upstream).sum(), [hidden, weight])

    assert torch.allclose(out.logps, expected, atol=TOL)
    assert torch.allclose(out.entropy, entropy, atol=TOL)
    assert torch.equal(out.correct, argmax)
    assert torch.allclose(got_h, grad_h, atol=1e-4) and torch.allclose(got_w, grad_w, atol=1e-4)
    assert grad_w.abs().max() > 0.1  # the comparison is not between two zeros


@pytest.mark.parametrize("chunk", [3, 1024])
def test_under_bf16_autocast_forward_and_backward_multiply_in_bf16_as_the_plain_path_does(chunk):
    """Backward runs outside autocast: it must still multiply in bf16 (as autocast runs the plain
    output layer's backward), and return gradients in the inputs' own dtypes."""
    torch.manual_seed(0)
    hidden = torch.randn(7, 16, requires_grad=True)
    weight = (3 * torch.randn(500, 16)).requires_grad_()
    targets = torch.randint(0, 500, (7,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = (hidden @ weight.T).float()  # the plain path: autocast's bf16 matmul
        expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
        out = linear_logps(hidden, weight, targets, chunk)
    grad_h, grad_w = torch.autograd.grad(expected.sum(), [hidden, weight])
    got_h, got_w = torch.autograd.grad(out.logps.sum(), [hidden, weight])
    assert got_h.dtype == got_w.dtype == torch.float32
    assert torch.allclose(out.logps, expected, atol=1e-4)
    # bf16 products on both sides, summed in different orders: within bf16's relative precision
    scale_h, scale_w = grad_h.abs().max(), grad_w.abs().max()
    assert (got_h - grad_h).abs().max() < 2 ** -6 * scale_h and (got_w - grad_w).abs().max() < 2 ** -6 * scale_w
    float32_w = torch.autograd.grad(linear_logps(hidden, weight, targets, chunk).logps.sum(), weight)[0]
    assert not torch.equal(got_w, float32_w)  # it did multiply in bf16


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_the_entropy_s_gradient_equals_the_plain_path_s(chunk):
    """An entropy bonus (recipe.entropy_coef) differentiates the chunked entropy: dH/dz = -p (log p + H)."""
    torch.manual_seed(1)
    hidden = torch.randn(7, 16, requires_grad=True)
    weight = (3 * torch.randn(500, 16)).requires_grad_()
    targets = torch.randint(0, 500, (7,))
    on_logps, on_entropy = torch.randn(7), torch.randn(7)
    expected, entropy, _ = plain(hidden, weight, targets, 0.7)
    want = torch.autograd.grad((expected * on_logps + entropy * on_entropy).sum(), [hidden, weight])
    out = linear_logps(hidden, weight, targets, chunk, 0.7, with_entropy=True)
    got = torch.autograd.grad((out.logps * on_logps + out.entropy * on_entropy).sum(), [hidden, weight], retain_graph=True)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-4)
    only_entropy = torch.autograd.grad(out.entropy.sum(), hidden)[0]
    assert only_entropy.abs().max() > 1e-3  # the entropy alone moves the hidden states


def tiny_lm(vocab: int = 300) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharpen the near-uniform initial predictions
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(4.0)
    return model


def grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("adapter", [False, True])
def test_response_log_probs_through_the_model_equal_the_plain_path(adapter):
    model = tiny_lm()
    if adapter:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    batch = left_padded_batch([[5, 6, 7, 8], [9], [11, 12, 13]], [[20, 21, 22], [23, 24, 25, 26, 27], [28]], pad_id=0)
    results = []
    for chunk in (0, 2):
        model.zero_grad()
        logps, keep, entropy = response_token_logps(model, batch, temperature=0.8, with_entropy=True, chunk=chunk)
        (logps.sum(-1) * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        results.append((logps.detach(), keep, entropy, grads(model)))
    (plain_logps, plain_keep, plain_entropy, plain_grads), (logps, keep, entropy, fused_grads) = results
    assert torch.equal(keep, plain_keep)
    assert torch.allclose(logps, plain_logps, atol=TOL) and torch.allclose(entropy, plain_entropy, atol=TOL)
    assert (logps * (1 - keep)).abs().max() == 0  # nothing outside the response
    assert len(fused_grads) == len(plain_grads) > 0
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(fused_grads, plain_grads))


def test_sft_loss_from_hidden_states_equals_sft_loss():
    model = tiny_lm()
    ids = torch.randint(3, 300, (3, 10))
    labels = ids.clone()
    labels[:, :4] = IGNORE  # prompt
    labels[1, 7:] = IGNORE  # padding
    head = output_head(model)
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    expected, expected_metrics = sft_loss(model.lm_head(hidden), labels, 11)
    loss, metrics = sft_loss_from_hidden(hidden, head.weight, labels, 11, chunk=4)
    assert abs(float(loss) - float(expected)) < TOL
    assert float(metrics["mean_token_accuracy"]) == pytest.approx(float(expected_metrics["mean_token_accuracy"]))
    assert float(metrics["num_loss_tokens"]) == float(expected_metrics["num_loss_tokens"]) == 15


def test_the_fused_path_stands_aside_for_an_adapted_or_biased_output_layer():
    from peft import LoraConfig, get_peft_model

    assert output_head(tiny_lm()) is not None
    assert output_head(get_peft_model(tiny_lm(), LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))) is None
    biased = tiny_lm()
    biased.lm_head = torch.nn.Linear(32, 300, bias=True)
    assert output_head(biased) is None
