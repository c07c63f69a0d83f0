"""Adapter parameter arithmetic and the dry-run planner, on the tiny model: LoRA adds r(d_in + d_out)
per adapted matrix and DoRA d_out more; the planner, which loads no weights, counts what the loaded
model counts; the memory formulas by hand."""

from __future__ import annotations

import pytest
import torch

from alignctl.adapters import apply_adapter, parameter_counts
from alignctl.hydra_app import compose_config
from alignctl.models import load_causal_lm, load_reward_model
from alignctl.plan import activation_bytes, adapter_parameters, linear_shapes, plan_model
from alignctl.validation import validate

# The tiny model: 6 layers, hidden 96, MLP 384; per layer q, k, v, o are 96 -> 96, gate and up
# 96 -> 384, down 384 -> 96.
PER_LAYER = [(96, 96)] * 4 + [(96, 384)] * 2 + [(384, 96)]


def config(tiny_dir, *overrides: str):
    return validate(compose_config(["model=hf", f"model.name_or_path={tiny_dir}", *overrides]))


@pytest.mark.parametrize("kind, extra", [("lora", 0), ("dora", 4 * 96 + 2 * 384 + 96)])
def test_trainable_parameters_follow_the_formulas(tiny_dir, kind, extra):
    cfg = config(tiny_dir, f"adapter={kind}", "adapter.r=8")
    base = load_causal_lm(str(tiny_dir), cfg.model, cfg.hardware)
    base_total = parameter_counts(base)[1]
    trainable, total = parameter_counts(apply_adapter(base, cfg.adapter))
    by_hand = 6 * (8 * (4 * (96 + 96) + 2 * (96 + 384) + (384 + 96)) + extra)  # r (d_in + d_out) per matrix (+ d_out for DoRA)
    assert trainable == by_hand == 6 * (17664 + extra)
    assert total == base_total + trainable
    assert adapter_parameters(PER_LAYER * 6, 8, kind == "dora") == by_hand


def test_target_module_list_adapts_only_those(tiny_dir):
    cfg = config(tiny_dir, "adapter=lora", "adapter.r=4", "adapter.target_modules=[q_proj,v_proj]")
    trainable, _ = parameter_counts(apply_adapter(load_causal_lm(str(tiny_dir), cfg.model, cfg.hardware), cfg.adapter))
    assert trainable == 6 * 2 * 4 * (96 + 96)


@pytest.mark.parametrize("adapter", ["none", "lora", "dora", "qlora"])
def test_planner_counts_match_the_loaded_policy(tiny_dir, adapter):
    cfg = config(tiny_dir, f"adapter={adapter}")
    loaded = apply_adapter(load_causal_lm(str(tiny_dir), cfg.model, cfg.hardware, cfg.adapter), cfg.adapter)
    planned = plan_model("policy", str(tiny_dir), cfg, trained=True)
    assert (planned.trainable, planned.total) == parameter_counts(loaded)
    assert planned.adapted_matrices == (0 if adapter == "none" else 42)


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_planner_counts_match_the_loaded_reward_model(tiny_dir, adapter):
    cfg = config(tiny_dir, "recipe=reward", f"adapter={adapter}", "recipe.extra_layers=0")
    loaded = apply_adapter(load_reward_model(str(tiny_dir), cfg.model, cfg.hardware, 0), cfg.adapter, "SEQ_CLS")
    planned = plan_model("reward", str(tiny_dir), cfg, trained=True, seq_cls=True)
    assert (planned.trainable, planned.total) == parameter_counts(loaded)


def test_qlora_weights_take_about_an_eighth_of_float32(tiny_dir):
    full = plan_model("policy", str(tiny_dir), config(tiny_dir, "adapter=lora", "hardware.autocast=null"), trained=True)
    quantized = plan_model("policy", str(tiny_dir), config(tiny_dir, "adapter=qlora"), trained=True)
    linear = 6 * sum(i * o for i, o in PER_LAYER)
    # The adapted matrices go from 4 bytes to 4.127 bits a value; the rest (embeddings, norms, adapter) is unchanged.
    assert full.weights - quantized.weights == pytest.approx(linear * (4 - 4.127 / 8))


def test_under_bf16_autocast_an_adapter_s_base_is_counted_in_bf16_and_the_adapter_in_float32(tiny_dir):
    float32 = plan_model("policy", str(tiny_dir), config(tiny_dir, "adapter=lora", "hardware.autocast=null"), trained=True)
    mixed_cfg = config(tiny_dir, "adapter=lora", "hardware.autocast=bf16")
    mixed = plan_model("policy", str(tiny_dir), mixed_cfg, trained=True)
    assert mixed_cfg.hardware.dtype == "bfloat16"  # hardware.dtype=auto, settled
    adapter_bytes = 4 * float32.trainable
    base_float32 = float32.weights - adapter_bytes
    assert mixed.weights == pytest.approx(base_float32 / 2 + adapter_bytes)
    assert mixed.gradients == float32.gradients and mixed.optimizer == float32.optimizer  # float32 adapters
    full = plan_model("policy", str(tiny_dir), config(tiny_dir, "adapter=none", "hardware.autocast=bf16"), trained=True)
    assert full.weights == 4 * full.total  # full fine-tuning keeps float32 master weights


def test_linear_shapes_of_all_linear_skip_the_output_head(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert sorted(linear_shapes(model, "all-linear")) == sorted(PER_LAYER * 6)


def test_activation_bytes_by_hand():
    # One layer, s=2, b=1, h=4, a=1, fp16: s*b*h*(34 + 5*a*s/h) = 8 * 36.5 = 292; logits 2*b*s*V*4 = 2*1*2*10*4 = 160.
    assert activation_bytes(batch=1, seq=2, hidden=4, heads=1, layers=1, vocab=10, dtype_bytes=2, checkpointing=False) == 292 + 160
    # float32 doubles the layer term; checkpointing keeps 2*s*b*h*bytes per layer plus one whole layer.
    assert activation_bytes(1, 2, 4, 1, 3, 10, 4, checkpointing=False) == 3 * 584 + 160
    assert activation_bytes(1, 2, 4, 1, 3, 10, 4, checkpointing=True) == 3 * (2 * 2 * 1 * 4 * 4) + 584 + 160


def test_qlora_without_bitsandbytes_is_one_clear_error(tiny_dir, monkeypatch):
    import importlib.util

    from alignctl.errors import AdapterError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    cfg = config(tiny_dir, "adapter=qlora")
    with pytest.raises(AdapterError, match="adapter=qlora needs bitsandbytes"):
        load_causal_lm(str(tiny_dir), cfg.model, cfg.hardware, cfg.adapter)


def test_qlora_gradients_reach_the_first_layer_after_an_evaluation(tiny_dir):
    """bitsandbytes repacks a 4-bit layer for inference after an eval-mode forward without gradients,
    and that kernel has no backward; models.keep_4bit_trainable keeps the trainable path."""
    cfg = config(tiny_dir, "adapter=qlora", "adapter.init_lora_weights=gaussian")
    model = apply_adapter(load_causal_lm(str(tiny_dir), cfg.model, cfg.hardware, cfg.adapter), cfg.adapter)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    first = [p.grad for n, p in model.named_parameters() if "layers.0.self_attn.q_proj.lora_B" in n]
    assert first and float(first[0].abs().sum()) > 0
