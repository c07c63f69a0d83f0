"""Adapter parameter arithmetic and the dry-run planner, on the tiny model: LoRA adds r(d_in + d_out)
per adapted matrix and DoRA d_out more; the planner, which loads no weights, counts what the loaded
model counts; the memory formulas by hand."""

from __future__ import annotations

import pytest
import torch

from alignctl.cli.app import compose_config
from alignctl.cli.plan import adapter_parameters, linear_shapes, plan_model
from alignctl.cli.plan_memory import Precision, Shapes, activation_bytes, layer_bytes_per_token
from alignctl.config.validation import validate
from alignctl.models.adapters import apply_adapter, parameter_counts
from alignctl.models.loading import load_causal_lm, load_reward_model

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
    on_gpu = ("hardware=gpu", "hardware.autocast=null")  # device memory: no mapped file
    full = plan_model("policy", str(tiny_dir), config(tiny_dir, "adapter=lora", *on_gpu), trained=True)
    quantized = plan_model("policy", str(tiny_dir), config(tiny_dir, "adapter=qlora", *on_gpu), trained=True)
    linear = 6 * sum(i * o for i, o in PER_LAYER)
    # The adapted matrices go from 4 bytes to 4.127 bits a value; the rest (embeddings, norms, adapter) is unchanged.
    assert full.weights - quantized.weights == pytest.approx(linear * (4 - 4.127 / 8))
    # On a CPU, a float32 compute dtype loads the rest as views of the float32 file, which then stays mapped
    # with the pages read for quantising: the float32 linear weights stay resident beside their 4-bit copies.
    on_cpu = plan_model("policy", str(tiny_dir), config(tiny_dir, "adapter=qlora"), trained=True)
    assert on_cpu.weights - quantized.weights == pytest.approx(linear * 4)
    bf16 = plan_model("policy", str(tiny_dir), config(tiny_dir, "adapter=qlora", "adapter.compute_dtype=bfloat16"), trained=True)
    assert bf16.loading == 4 * (bf16.total - bf16.trainable)  # converted while the file is mapped, then unmapped


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
    s = Shapes(hidden=4, kv=2, intermediate=8, layers=1, vocab=10)
    bf16_base = Precision(compute=2, casts_inputs=False, four_bit=False, norms_trained=False)
    # norms 2*4h = 32; linear inputs c(3h + I) = 40; q, k, v, out 4ch = 32; gate and up 2cI = 32.
    assert layer_bytes_per_token(s, bf16_base, fused_mlp=True) == 136
    assert layer_bytes_per_token(s, bf16_base, fused_mlp=False) == 136 + 16  # silu(gate) kept too
    # float32 weights trained under bf16 autocast: normalised outputs 2ch = 16 more, each linear casts its input: c(6h + I) = 64.
    full = Precision(compute=2, casts_inputs=True, four_bit=False, norms_trained=True)
    assert layer_bytes_per_token(s, full, fused_mlp=True) == 32 + 16 + 64 + 32 + 32
    # A 4-bit base keeps two more float32 (tokens x h) tensors a layer: 2*4h = 32.
    four_bit = Precision(compute=2, casts_inputs=True, four_bit=True, norms_trained=False)
    assert layer_bytes_per_token(s, four_bit, fused_mlp=True) == 32 + 64 + 32 + 32 + 32
    # recipe.fused_rms_norm: each norm keeps its input as it comes, 2*stream*h: the bf16 stream of a bf16
    # base 2*2*4 = 16 instead of 32; the float32 stream of float32 or 4-bit weights 2*4*4 = 32 as before,
    # and no normalised outputs for trained norms (16 fewer).
    assert layer_bytes_per_token(s, bf16_base, fused_mlp=True, fused_norm=True) == 136 - 32 + 16
    assert layer_bytes_per_token(s, full, fused_mlp=True, fused_norm=True) == 32 + 64 + 32 + 32
    assert layer_bytes_per_token(s, four_bit, fused_mlp=True, fused_norm=True) == 32 + 64 + 32 + 32 + 32
    # 1 x 2 tokens: 272 for the layer; float32 logits and their gradient 2*2*V*4 = 160, or one chunk of
    # positions (logits, exponentials, gradient: 3*1*V*4 = 120) with lm_head_chunk.
    assert activation_bytes(1, 2, 2, s, bf16_base, True, head_chunk=0, checkpointing=False) == 272 + 160
    assert activation_bytes(1, 2, 2, s, bf16_base, True, head_chunk=1, checkpointing=False) == 272 + 120
    # Checkpointing: each of 3 layers keeps its input (2 tokens x ch = 16), and one layer is whole again.
    three = Shapes(hidden=4, kv=2, intermediate=8, layers=3, vocab=10)
    assert activation_bytes(1, 2, 2, three, bf16_base, True, 0, checkpointing=True) == 3 * 16 + 272 + 160
    assert activation_bytes(1, 2, 2, three, bf16_base, True, 0, checkpointing=False) == 3 * 272 + 160


def test_plan_for_a_gpu_needs_no_gpu_and_stores_an_adapter_s_base_in_bf16(tiny_dir, monkeypatch):
    """hardware=gpu planned on a machine without one: a GPU with native bf16 is assumed, so LoRA's
    frozen base counts 2 bytes a value and full fine-tuning keeps float32 master weights."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lora_cfg = config(tiny_dir, "adapter=lora", "hardware=gpu")  # model=hf: not the built-in tiny model
    lora = plan_model("policy", str(tiny_dir), lora_cfg, trained=True)
    assert (lora_cfg.hardware.autocast, lora_cfg.hardware.dtype) == ("bf16", "bfloat16")
    assert lora.weights == 2 * (lora.total - lora.trainable) + 4 * lora.trainable
    assert lora.loading == 0  # device memory: loading happens on the host
    full_cfg = config(tiny_dir, "adapter=none", "hardware=gpu")
    full = plan_model("policy", str(tiny_dir), full_cfg, trained=True)
    assert full_cfg.hardware.dtype == "float32" and full.weights == 4 * full.total


def test_qlora_without_bitsandbytes_is_one_clear_error(tiny_dir, monkeypatch):
    import importlib.util

    from alignctl.core.errors import AdapterError

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


@pytest.mark.parametrize("adapter", ["none", "lora", "dora"])
def test_under_bf16_an_adapter_s_base_loads_in_bf16_its_adapter_in_float32_and_plan_counts_those_bytes(tiny_dir, adapter):
    """What a stage loads once hardware.dtype=auto is settled under bf16 autocast (as hardware=gpu and
    hardware=cpu settle it where bf16 is native): the frozen base in bf16, every trained parameter in
    float32 (peft's autocast_adapter_dtype), full fine-tuning in float32; plan's weights are those bytes."""
    from alignctl.models.precision import settle

    cfg = config(tiny_dir, f"adapter={adapter}", "hardware.autocast=bf16")
    settle(cfg, "cpu")
    model = apply_adapter(load_causal_lm(str(tiny_dir), cfg.model, cfg.hardware, cfg.adapter), cfg.adapter)
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained == {torch.float32}
    assert frozen == (set() if adapter == "none" else {torch.bfloat16})
    loaded = sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan_model("policy", str(tiny_dir), cfg, trained=True).weights == loaded


def test_activations_are_sized_from_the_data_s_longest_batch_not_max_length(tiny_dir):
    from alignctl.cli.plan_data import batch_shape
    from alignctl.data.loading import load_split
    from alignctl.models.loading import load_tokenizer
    from alignctl.stages.sft import encode_split

    cfg = config(tiny_dir, "recipe=sft", "recipe.max_length=64", "recipe.batch_size=4")
    encoded = encode_split(load_split(cfg.data, "sft", "train"), load_tokenizer(str(tiny_dir), cfg.model), cfg.recipe, cfg, "task")[0]
    lengths = sorted((len(ids) for ids in encoded["input_ids"]), reverse=True)
    shape = batch_shape(cfg, str(tiny_dir))
    assert (shape.rows, shape.width) == (4, lengths[0]) and lengths[0] < 64
    assert "token lengths" in shape.source
    unreadable = config(tiny_dir, "recipe=sft", "recipe.max_length=64", "recipe.batch_size=4", "data=hf", "data.path=/nonexistent.jsonl")
    wider = plan_model("policy", str(tiny_dir), unreadable, trained=True, shape=batch_shape(unreadable, str(tiny_dir)))
    assert "recipe.max_length (the data could not be read here" in wider.shape.source and wider.shape.width == 64
    narrow = plan_model("policy", str(tiny_dir), cfg, trained=True, shape=shape)
    assert narrow.activations < wider.activations


def test_dpo_batches_hold_chosen_and_rejected_with_left_padded_prompts(tiny_dir):
    from alignctl.cli.plan_data import batch_shape

    shape = batch_shape(config(tiny_dir, "recipe=dpo", "recipe.max_length=64", "recipe.batch_size=3"), str(tiny_dir))
    assert shape.rows == 6 and shape.width <= 2 * 64 and shape.positions < shape.rows * shape.width


def test_reward_and_kto_batches_are_sized_from_their_data(tiny_dir):
    from alignctl.cli.plan_data import batch_shape
    from alignctl.data.loading import load_split
    from alignctl.models.loading import load_tokenizer
    from alignctl.stages.reward import encode_pairs

    cfg = config(tiny_dir, "recipe=reward", "recipe.max_length=64", "recipe.batch_size=3")
    encoded = encode_pairs(load_split(cfg.data, "preference", "train"), load_tokenizer(str(tiny_dir), cfg.model), cfg.recipe, cfg, "task")
    reward = batch_shape(cfg, str(tiny_dir))
    # Three pairs: six sequences right-padded to the longest side in the data; one score read from each.
    assert (reward.rows, reward.width, reward.positions) == (6, max(len(ids) for side in ("chosen", "rejected") for ids in encoded[side]), 6)
    assert "token lengths" in reward.source and reward.width < 64

    kto = batch_shape(config(tiny_dir, "recipe=kto", "recipe.max_length=64", "recipe.batch_size=3"), str(tiny_dir))
    assert kto.rows == 3 and kto.width < 64 and "token lengths" in kto.source
    assert 0 < kto.positions < kto.rows * kto.width  # completion tokens only reach the output layer
