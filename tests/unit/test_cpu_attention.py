"""alignctl.nn.cpu_attention: under CPU bf16 autocast, attention that needs a gradient runs sdpa's bf16
forward (the same output) and a float32 backward, keeping less for backward than float32 attention;
without a gradient it is sdpa itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from saved_tensors import saved_bytes
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from alignctl.nn import cpu_attention
from alignctl.nn.lm_head import final_hidden, keep_last


def _qkv(requires_grad: bool, kv_heads: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(0)
    shapes = [(2, 3, 7, 8), (2, kv_heads, 7, 8), (2, kv_heads, 7, 8)]
    return [torch.randn(shape, requires_grad=requires_grad) for shape in shapes]


def _exact_gradients(q, k, v, upstream, **kwargs) -> list[torch.Tensor]:
    """The gradients of float64 attention on the same (bf16-rounded) inputs."""
    exact = [t.detach().to(torch.bfloat16).double().requires_grad_() for t in (q, k, v)]
    (F.scaled_dot_product_attention(*exact, **kwargs) * upstream.double()).sum().backward()
    return [t.grad for t in exact]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kv_heads", [3, 1])
def test_with_a_gradient_the_forward_is_bf16_sdpa_and_the_backward_float32(masked, kv_heads):
    q, k, v = _qkv(True, kv_heads)
    kwargs = {"enable_gqa": kv_heads != 3}
    if masked:  # right padding in the first row: its last two keys are never attended
        mask = torch.ones(2, 1, 7, 7, dtype=torch.bool).tril()
        mask[0, :, :, 5:] = False
        kwargs["attn_mask"] = mask
    else:
        kwargs["is_causal"] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cpu_attention.sdpa(q, k, v, **kwargs)
        plain = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert out.dtype == torch.bfloat16 and torch.equal(out, plain)  # what sdpa itself returns under autocast
    upstream = torch.randn(out.shape)
    (out.float() * upstream).sum().backward()
    for mine, exact in zip((q.grad, k.grad, v.grad), _exact_gradients(q, k, v, upstream, **kwargs)):
        # float32 arithmetic throughout; the error is the output's and the gradients' bf16 rounding
        torch.testing.assert_close(mine.double(), exact, rtol=2 ** -6, atol=2 ** -6 * exact.abs().max().item())


def test_dropout_keeps_attention_in_float32_through_sdpa():
    q, k, v = _qkv(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        out = cpu_attention.sdpa(q, k, v, is_causal=True, dropout_p=0.5)
    assert out.dtype == torch.bfloat16
    assert out.grad_fn.next_functions[0][0].name() != "FlashBackwardInFloat32Backward"
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def _graph_names(tensor: torch.Tensor) -> set[str]:
    seen, names, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_a_call_off_the_training_path_goes_through_transformers_sdpa_function_with_the_same_rule(monkeypatch):
    """More keys than queries (a prefill after cached tokens): transformers' own function, whose sdpa
    call still runs the float32 backward, and its output is what sdpa itself gives."""
    calls = []
    original = cpu_attention.sdpa_attention_forward
    monkeypatch.setattr(cpu_attention, "sdpa_attention_forward", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    model = cpu_attention.use_on_cpu(_model("sdpa"))
    attention = model.model.layers[0].self_attn
    q, k, v = (torch.randn(2, heads, length, 4, requires_grad=True) for heads, length in ((4, 3), (2, 7), (2, 7)))
    mask = torch.ones(2, 1, 3, 7, dtype=torch.bool).tril(diagonal=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = cpu_attention.attention_forward(attention, q, k, v, mask, scaling=0.5)
        direct = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5, enable_gqa=True).transpose(1, 2)
    assert calls and torch.equal(out, direct)
    assert "FlashBackwardInFloat32Backward" in _graph_names(out)


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


def test_grouped_query_attention_keeps_less_with_one_key_value_head_per_group(monkeypatch):
    """A padded batch (transformers then repeats the key and value heads before sdpa) through a model
    with 4 query heads over 2 key-value heads: the kernel gets the 2 heads, the gradients are float32
    attention's to bf16 rounding, and backward keeps at least the float32 query and output less."""
    ids = torch.randint(0, 40, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # right padding: a mask reaches the attention function
    key_shapes = []
    flash = cpu_attention.FlashBackwardInFloat32.apply

    def spied(query, key, *args):
        key_shapes.append(tuple(key.shape))
        return flash(query, key, *args)

    def run(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss

    def trained(in_float32: bool):
        model = cpu_attention.use_on_cpu(_model("sdpa"))
        monkeypatch.setattr(cpu_attention.FlashBackwardInFloat32, "apply", spied)
        if in_float32:
            monkeypatch.setattr(cpu_attention, "_flash_backward_in_float32", lambda *args, **kwargs: None)
        kept = saved_bytes(lambda: run(model))
        run(model).backward()
        monkeypatch.undo()
        return kept, {name: p.grad for name, p in model.named_parameters()}

    kept, grads = trained(in_float32=False)
    batch, heads, kv_heads, length, head_dim, layers = 2, 4, 2, 9, 4, 2
    assert key_shapes == [(batch, kv_heads, length, head_dim)] * 2 * layers  # two forwards
    float32_kept, float32_grads = trained(in_float32=True)
    assert len(key_shapes) == 2 * layers
    assert float32_kept - kept >= layers * 2 * (4 * batch * heads * length * head_dim)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, float32_grads[name], rtol=0.05, atol=0.01 * float32_grads[name].abs().max().item())


def test_the_training_path_gives_transformers_sdpa_output_with_key_value_heads_once_per_group():
    attention = _model("sdpa").model.layers[0].self_attn
    q, k, v = (torch.randn(2, heads, 9, 4, requires_grad=True) for heads in (4, 2, 2))
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
    mask[0, ..., 6:] = False  # right padding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for attn_mask in (mask, None):
            ours, _ = cpu_attention.attention_forward(attention, q, k, v, attn_mask, scaling=0.5)
            theirs, _ = sdpa_attention_forward(attention, q, k, v, attn_mask, scaling=0.5)
            assert ours.shape == (2, 9, 4, 4) and torch.equal(ours, theirs)
