"""recipe.fused_mlp: the SwiGLU MLP that keeps (gate, up) for backward gives the plain path's outputs
bit for bit and its gradients to float rounding, with and without LoRA, and keeps fewer tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from saved_tensors import saved_bytes
from transformers import LlamaConfig, LlamaForCausalLM

from alignctl.nn.fused_mlp import SiluMul, fuse_swiglu, is_swiglu


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, max_position_embeddings=64)
    return LlamaForCausalLM(config).float()


def test_silu_mul_gradients_match_autograd():
    gate = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiluMul.apply, (gate, up))
    # Limiting values by hand: silu'(0) = 1/2, silu(0) = 0, so at gate = 0 the grads are (up / 2, 0).
    zero = torch.zeros(3, requires_grad=True)
    u = torch.tensor([1.0, -2.0, 4.0], requires_grad=True)
    SiluMul.apply(zero, u).sum().backward()
    assert torch.equal(zero.grad, torch.tensor([0.5, -1.0, 2.0]))
    assert torch.equal(u.grad, torch.zeros(3))


@pytest.mark.parametrize("lora", [False, True])
def test_fused_model_matches_plain_model(lora):
    plain = _model()
    if lora:
        from peft import LoraConfig, get_peft_model

        plain = get_peft_model(plain, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    fused = copy.deepcopy(plain)
    assert fuse_swiglu(fused) == 2
    assert fuse_swiglu(fused) == 0  # already patched: nothing more
    ids = torch.randint(0, 50, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    outputs = {}
    for name, model in (("plain", plain), ("fused", fused)):
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits.float().pow(2).mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        outputs[name] = (logits.detach(), grads)
    assert torch.equal(outputs["plain"][0], outputs["fused"][0])  # same forward arithmetic
    for name, grad in outputs["plain"][1].items():
        torch.testing.assert_close(outputs["fused"][1][name], grad, rtol=1e-5, atol=1e-7)


def test_fused_mlp_saves_one_intermediate_tensor_less_per_layer():
    plain, fused = _model(), _model()
    fuse_swiglu(fused)
    ids = torch.randint(0, 50, (4, 16))
    kept = {name: saved_bytes(lambda m=model: m(input_ids=ids).logits) for name, model in (("plain", plain), ("fused", fused))}
    one_intermediate = 4 * 16 * 96 * 4  # (B, T, intermediate) float32, per layer
    assert kept["plain"] - kept["fused"] == 2 * one_intermediate  # 2 layers


def test_only_swiglu_mlps_are_patched():
    class GeluMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(2, 2) for _ in range(3))
            self.act_fn = torch.nn.GELU()

    assert not is_swiglu(GeluMLP())
    assert is_swiglu(_model().model.layers[0].mlp)


def test_without_gradient_the_plain_ops_run():
    model = _model()
    fuse_swiglu(model)
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, 50, (2, 5))).logits
    assert logits.grad_fn is None
