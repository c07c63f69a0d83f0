"""alignctl.nn.lora_linear: the fused LoRA linear computes peft's outputs and gradients, hands every
non-plain case to peft's own forward, and saves a plain peft adapter."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignctl.config.schema import LoraConfig
from alignctl.models.adapters import apply_adapter
from alignctl.nn.lora_linear import (
    FusedLoraLinear,
    GroupedLoraFunction,
    group_projections,
    separate_projections,
)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        max_position_embeddings=32)).eval()


def lora(base, fused: bool, **extra):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **extra)
    if fused:
        config._register_custom_module({torch.nn.Linear: FusedLoraLinear})
    torch.manual_seed(1)  # the same random A and B on both sides
    return peft.get_peft_model(copy.deepcopy(base), config)


def forward_backward(model, ids):
    logits = model(input_ids=ids).logits
    (logits * torch.linspace(-1, 1, logits.size(-1))).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_outputs_and_gradients_equal_peft(base):
    ids = torch.randint(0, 32, (3, 7))
    plain, fused = lora(base, False), lora(base, True)
    assert isinstance(fused.base_model.model.model.layers[0].mlp.down_proj, FusedLoraLinear)
    expected_logits, expected_grads = forward_backward(plain, ids)
    logits, grads = forward_backward(fused, ids)
    assert torch.allclose(logits, expected_logits, atol=1e-6)
    assert expected_grads.keys() == grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        # float32 rounding (the fused backward sums the same products in another order), relative to the
        # tensor's scale (its entries reach 70 here; a wrong term would be off by O(1), not 1e-5)
        scale = expected_grads[name].abs().max()
        assert (grad - expected_grads[name]).abs().max() <= 1e-5 * scale, name
    assert any(g.abs().max() > 0 for g in grads.values())


def test_disabled_merged_and_dora_go_through_peft(base):
    ids = torch.randint(0, 32, (2, 5))
    fused = lora(base, True)
    with torch.no_grad():
        adapted = fused(input_ids=ids).logits
        with fused.disable_adapter():
            assert torch.allclose(fused(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)
        fused.merge_adapter()
        assert torch.allclose(fused(input_ids=ids).logits, adapted, atol=1e-5)
        fused.unmerge_adapter()
        dora_plain, dora_fused = lora(base, False, use_dora=True), lora(base, True, use_dora=True)
        assert torch.allclose(dora_fused(input_ids=ids).logits, dora_plain(input_ids=ids).logits, atol=1e-6)


def test_apply_adapter_uses_it_for_lora_and_saves_a_plain_adapter(base, tmp_path):
    model = apply_adapter(copy.deepcopy(base), LoraConfig(kind="lora", r=4, alpha=8, dropout=0.0, target_modules="all-linear", use_rslora=False, init_lora_weights=True, bias="none"))
    assert sum(isinstance(m, FusedLoraLinear) for m in model.modules()) == 14
    model.save_pretrained(tmp_path)
    assert "custom" not in (tmp_path / "adapter_config.json").read_text()
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert not any(isinstance(m, FusedLoraLinear) for m in reloaded.modules())
    dora = apply_adapter(copy.deepcopy(base), LoraConfig(kind="dora", r=4, alpha=8, dropout=0.0, target_modules="all-linear", use_rslora=False, init_lora_weights=True, bias="none"))
    assert not any(isinstance(m, FusedLoraLinear) for m in dora.modules())


@pytest.mark.parametrize("with_bias", [False, True])
def test_lora_linear_function_gradients_match_finite_differences(with_bias):
    from alignctl.nn.lora_linear import LoraLinearFunction

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64) if with_bias else None
    lora_a = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    expected = torch.nn.functional.linear(x, weight, bias) + 0.5 * (x @ lora_a.T) @ lora_b.T
    assert torch.allclose(LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, 0.5), expected)
    assert torch.autograd.gradcheck(lambda *t: LoraLinearFunction.apply(t[0], weight, bias, t[1], t[2], 0.5), (x, lora_a, lora_b))


def test_the_layer_runs_as_one_function_unless_dropout_is_on(base):
    ids = torch.randint(0, 32, (2, 5))

    def backward_nodes(model) -> set[str]:
        seen, todo = {}, [model(input_ids=ids).logits.sum().grad_fn]
        while todo:
            node = todo.pop()
            if node is not None and id(node) not in seen:
                seen[id(node)] = node  # held, so that ids are not reused by later wrappers
                todo += [next_fn for next_fn, _ in node.next_functions]
        return {type(node).__name__ for node in seen.values()}

    assert "LoraLinearFunctionBackward" in backward_nodes(lora(base, True).train())
    assert "LoraLinearFunctionBackward" not in backward_nodes(lora(base, True, lora_dropout=0.1).train())


def bf16_forward_backward(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    (logits.float() * torch.linspace(-1, 1, logits.size(-1))).sum().backward()
    return logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_under_bf16_autocast_it_is_as_close_to_float32_as_peft_and_keeps_float32_adapters(base, dropout):
    """Under autocast the fused function (no dropout) and the in-place path (dropout) run their matmuls
    in bf16 as peft's layer does. bf16 keeps 8 bits of mantissa, so both drift from the float32 run by
    several percent on this random model; the fused layer rounds fewer intermediate sums, and must be
    no further from float32 than peft itself. Adapters and their gradients stay float32."""
    ids = torch.randint(0, 32, (3, 7))
    reference = lora(base, False, lora_dropout=dropout).train()
    torch.manual_seed(2)
    exact_logits, exact_grads = forward_backward(reference, ids)
    errors = {}
    for fused in (False, True):
        model = lora(base, fused, lora_dropout=dropout).train()
        torch.manual_seed(2)  # the same dropout masks
        logits, grads = bf16_forward_backward(model, ids)
        assert grads.keys() == exact_grads.keys() and all(g.dtype == torch.float32 for g in grads.values())
        assert all(p.dtype == torch.float32 for p in model.parameters())
        errors[fused] = (relative_error(logits, exact_logits), max(relative_error(grads[n], exact_grads[n]) for n in grads))
    assert errors[True][0] <= 1.5 * errors[False][0], errors
    assert errors[True][1] <= 1.5 * errors[False][1], errors
    assert max(errors[True]) < 0.2, errors  # bf16 rounding, not a wrong term


def test_two_active_adapters_under_autocast_take_the_in_place_path(base):
    model = lora(base, True)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    config._register_custom_module({torch.nn.Linear: FusedLoraLinear})
    model.add_adapter("second", config)
    model.base_model.set_adapter(["default", "second"])
    ids = torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(input_ids=ids).logits
    assert got.dtype == torch.bfloat16
    assert relative_error(got.float(), expected) < 0.2  # bf16 rounding (see above), not a missing term
    with torch.no_grad():
        model.base_model.set_adapter(["default"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            one_adapter = model(input_ids=ids).logits
    assert relative_error(one_adapter.float(), got.float()) > 0.2  # the second adapter does count


def grouped(model):
    assert group_projections(model) == 2 * 2  # q|k|v and gate|up in each of the 2 layers
    return model


@pytest.mark.parametrize("autocast", [False, True])
def test_grouped_projections_compute_the_same_numbers_in_one_function_per_group(base, autocast, monkeypatch):
    """q|k|v and gate|up run as one GroupedLoraFunction each: the same outputs and gradients as one
    function per projection (the same products; the input's gradient summed in the same dtype)."""
    ids = torch.randint(0, 32, (3, 7))
    run = bf16_forward_backward if autocast else forward_backward
    expected_logits, expected_grads = run(lora(base, True).train(), ids)
    calls = []
    original = GroupedLoraFunction.apply
    monkeypatch.setattr(GroupedLoraFunction, "apply", lambda *args: calls.append(len(args[1])) or original(*args))
    logits, grads = run(grouped(lora(base, True).train()), ids)
    assert sorted(calls) == [2, 2, 3, 3]  # per layer: one call for q|k|v, one for gate|up
    assert torch.equal(logits, expected_logits)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, expected_grads[name], rtol=1e-6, atol=1e-6 * expected_grads[name].abs().max()), name


def test_a_waiting_output_is_not_taken_after_its_adapter_changed(base):
    model = grouped(lora(base, True))
    attention = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        attention.q_proj(x)  # computes k and v too; they wait on x
        attention.k_proj.lora_B["default"].weight.mul_(3)
        got = attention.k_proj(x)
        with separate_projections():
            expected = attention.k_proj(x)
    assert torch.equal(got, expected)
    with torch.no_grad():
        x.add_(1)  # x itself changed: v's waiting output is stale too
        got_v = attention.v_proj(x)
        with separate_projections():
            expected_v = attention.v_proj(x)
    assert torch.equal(got_v, expected_v)


def test_a_group_member_called_alone_trains_alone(base):
    """Only q_proj's output reaches the loss: k and v were computed but get no gradient work, and q's
    adapter gets the gradient it gets outside a group."""
    x = torch.randn(2, 3, 16)
    grads = {}
    for group in (False, True):
        model = grouped(lora(base, True)) if group else lora(base, True)
        attention = model.base_model.model.model.layers[0].self_attn
        attention.q_proj(x).pow(2).sum().backward()
        grads[group] = attention.q_proj.lora_B["default"].weight.grad.clone()
        assert attention.k_proj.lora_B["default"].weight.grad is None
    assert torch.equal(grads[True], grads[False])
