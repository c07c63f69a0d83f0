"""recipe.fused_rms_norm: the RMSNorm that keeps its input and one float a token gives the model's own
outputs bit for bit and its gradients to float rounding (float32, bf16, LoRA over a bf16 base, full
fine-tuning of the norm's weight), keeps less for backward, and patches only the norms of that formula."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from saved_tensors import saved_bytes
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from alignctl.nn.fused_rms_norm import RMSNormFunction, fuse_rms_norms, is_rms_norm


def _llama(dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, max_position_embeddings=64)
    model = LlamaForCausalLM(config).to(dtype)
    for norm in (m for m in model.modules() if is_rms_norm(m)):  # weights away from 1, so that they matter
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    return model


def test_gradients_match_autograd_by_gradcheck_and_a_hand_worked_row():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, dtype=torch.float64).add_(0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), (x, w))
    # By hand, eps = 0: the row (3, 4) has rms 5/sqrt(2), so x̂ = (3, 4)·sqrt(2)/5; with weight (1, 1) and
    # loss = y₁, d loss/d x = rstd·(e₁ − x̂·x̂₁/2) = (sqrt(2)/5)·(1 − 9/25, −12/25), d loss/d w = x̂.
    row = torch.tensor([[3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    weight = torch.ones(2, dtype=torch.float64, requires_grad=True)
    RMSNormFunction.apply(row, weight, 0.0)[0, 0].backward()
    root2 = 2.0 ** 0.5
    torch.testing.assert_close(row.grad, torch.tensor([[root2 / 5 * 16 / 25, -root2 / 5 * 12 / 25]], dtype=torch.float64))
    torch.testing.assert_close(weight.grad, torch.tensor([3 * root2 / 5, 0.0], dtype=torch.float64))


def _run(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("setting", ["full-float32", "lora-bf16-base-autocast", "full-autocast"])
def test_fused_model_matches_the_models_own(setting):
    plain = _llama(torch.bfloat16 if setting == "lora-bf16-base-autocast" else torch.float32)
    if setting.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        plain = get_peft_model(plain, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        for name, parameter in plain.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.float()
    fused = copy.deepcopy(plain)
    assert fuse_rms_norms(fused) == 5  # two a layer and the final norm
    assert fuse_rms_norms(fused) == 0  # already patched
    ids = torch.randint(0, 50, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting != "full-float32"):
        theirs, their_grads = _run(plain, ids, mask)
        ours, our_grads = _run(fused, ids, mask)
    assert torch.equal(ours, theirs)  # the same forward ops, in the same order
    assert set(our_grads) == set(their_grads) and any("norm" in n for n in our_grads) == setting.startswith("full")
    for name, grad in their_grads.items():
        if setting == "full-float32":
            torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6)
        else:  # bf16 activations: both round, in different places; within a few bf16 steps of the gradient's scale
            assert float((our_grads[name] - grad).abs().max()) <= 0.05 * float(grad.abs().max()) + 1e-6, name


def test_under_a_bf16_stream_it_keeps_less_for_backward():
    """A bf16 base: the model's norm keeps a float32 copy of its input; the fused one the bf16 input (both
    keep the reciprocal RMS, one float a token): 5 norms x (4 - 2) bytes x hidden 32 less, per token."""
    plain = _llama(torch.bfloat16)
    for parameter in plain.parameters():
        parameter.requires_grad_(False)
    fused = copy.deepcopy(plain)
    fuse_rms_norms(fused)
    ids = torch.randint(0, 50, (4, 16))

    def forward(model):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        return model(inputs_embeds=embeds).logits

    kept = {name: saved_bytes(lambda m=model: forward(m)) for name, model in (("plain", plain), ("fused", fused))}
    tokens = 4 * 16
    assert kept["plain"] - kept["fused"] == 5 * tokens * (4 * 32 - 2 * 32)


def test_only_norms_of_that_formula_are_patched_and_without_gradient_the_plain_ops_run():
    class GemmaLikeNorm(torch.nn.Module):  # weight * (1 + ...): another formula, another class name
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.zeros(4)), 1e-6

    assert not is_rms_norm(GemmaLikeNorm()) and not is_rms_norm(torch.nn.LayerNorm(4))
    config = Qwen3Config(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, intermediate_size=64, max_position_embeddings=64)
    qwen = Qwen3ForCausalLM(config)
    assert fuse_rms_norms(qwen) == 5  # input, post-attention, q and k norms, the final norm
    model = _llama()
    fuse_rms_norms(model)
    with torch.no_grad():
        assert model(input_ids=torch.randint(0, 50, (2, 5))).logits.grad_fn is None


def test_the_patch_survives_transformers_switching_train_and_eval(tiny_dir):
    """from_pretrained turns hub kernels on where the `kernels` package is installed; every train/eval
    switch then re-kernelizes the norm classes, which drops a forward set on the instance."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    if importlib.util.find_spec("kernels") is not None:
        assert model.use_kernels  # the case that drops an instance's forward
    assert fuse_rms_norms(model) > 0
    for mode in (True, False, True):
        model.train(mode)
    x = torch.randn(2, 3, model.config.hidden_size, requires_grad=True)
    norm = model.model.norm
    assert type(norm).__name__ == "FusedLlamaRMSNorm" and isinstance(norm, type(model.model.layers[0].input_layernorm))
    assert type(norm(x).grad_fn).__name__ == "RMSNormFunctionBackward"
    assert fuse_rms_norms(model) == 0  # already patched
