"""alignctl.nn.cpu_attention: under CPU bf16 autocast, attention that needs a gradient runs in float32
(same values as float32 sdpa, returned in the dtype sdpa returns); without a gradient it is sdpa itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from alignctl.nn import cpu_attention
from alignctl.nn.lm_head import final_hidden, keep_last


def _qkv(requires_grad: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(2, 3, 7, 8, requires_grad=requires_grad) for _ in range(3)]


def test_with_a_gradient_under_bf16_autocast_attention_is_float32_sdpa():
    q, k, v = _qkv(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cpu_attention.sdpa(q, k, v, is_causal=True)
    assert out.dtype == torch.bfloat16  # what sdpa itself returns under autocast
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # float32 values, rounded once to bf16 at the end (bf16 keeps 8 significant bits)
    assert torch.allclose(out.float(), reference, rtol=2 ** -8, atol=1e-6)
    out.float().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference.sum().backward()
    for mine, theirs in zip(grads, (q.grad, k.grad, v.grad)):
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-5)  # backward ran in float32 too


def test_without_a_gradient_it_is_the_bf16_kernel_itself():
    q, k, v = _qkv(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_attention.runs_in_float32(q)
        assert torch.equal(cpu_attention.sdpa(q, k, v, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_float32_without_autocast_is_left_to_sdpa():
    q, k, v = _qkv(True)
    assert not cpu_attention.runs_in_float32(q)
    assert cpu_attention.runs_in_float32(q.to(torch.bfloat16))  # bf16 tensors without autocast


def _model(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attn)
    return LlamaForCausalLM(config)


def test_use_on_cpu_switches_sdpa_models_only_and_keeps_their_outputs():
    model = _model("sdpa")
    ids = torch.randint(0, 40, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: a mask reaches the attention function
    before = model(input_ids=ids, attention_mask=mask).logits
    assert cpu_attention.use_on_cpu(model) is model
    assert model.config._attn_implementation == cpu_attention.NAME
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    eager = _model("eager")
    cpu_attention.use_on_cpu(eager)
    assert eager.config._attn_implementation == "eager"


def test_a_model_trains_under_autocast_with_float32_attention_gradients():
    model = cpu_attention.use_on_cpu(_model("sdpa"))
    reference = _model("sdpa")
    ids = torch.randint(0, 40, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
        reference(input_ids=ids, labels=ids).loss.backward()
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
        assert torch.isfinite(mine.grad).all(), name
        # the same maths: the two differ only by the attention's bf16 rounding
        assert torch.allclose(mine.grad, theirs.grad, rtol=0.1, atol=2e-3), name


@pytest.mark.parametrize("count", [1, 4, 20])
def test_keep_last_keeps_the_logits_an_int_keeps(count):
    model = _model("sdpa")
    ids = torch.randint(0, 40, (2, 9))
    assert keep_last(ids, count).tolist() == list(range(max(9 - count, 0), 9))
    assert torch.equal(model(input_ids=ids, logits_to_keep=keep_last(ids, count)).logits, model(input_ids=ids, logits_to_keep=count).logits)
    hidden = final_hidden(model, input_ids=ids)
    assert torch.equal(hidden, model.model(input_ids=ids).last_hidden_state)
