"""alignctl.models.precision: what hardware.autocast=auto and hardware.dtype=auto mean, and float32 training
weights over a bf16 base."""

from __future__ import annotations

from types import SimpleNamespace

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from alignctl.models import precision


def run_config(source="hf", adapter="lora", autocast="auto", dtype="auto"):
    hardware = SimpleNamespace(autocast=autocast, dtype=dtype)
    return SimpleNamespace(hardware=hardware, model=SimpleNamespace(source=source), adapter=SimpleNamespace(kind=adapter))


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_where_the_device_has_it_and_the_base_goes_bf16_under_an_adapter(monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device_type: native)
    for adapter, base in (("lora", "bfloat16"), ("dora", "bfloat16"), ("qlora", "float32"), ("none", "float32")):
        cfg = run_config(adapter=adapter)
        precision.settle(cfg, "cpu")
        assert cfg.hardware.autocast == ("bf16" if native else None)
        assert cfg.hardware.dtype == (base if native else "float32"), adapter


def test_the_tiny_model_and_explicit_settings_are_kept(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device_type: True)
    tiny = run_config(source="tiny")
    precision.settle(tiny, "cpu")
    assert (tiny.hardware.autocast, tiny.hardware.dtype) == (None, "float32")  # the demo's figures everywhere
    forced = run_config(autocast=None)
    precision.settle(forced, "cpu")
    assert (forced.hardware.autocast, forced.hardware.dtype) == (None, "float32")
    explicit = run_config(autocast="bf16", dtype="float32")
    precision.settle(explicit, "cpu")
    assert (explicit.hardware.autocast, explicit.hardware.dtype) == ("bf16", "float32")
    assert "bf16 mixed precision" in precision.describe(explicit, "cpu")


def test_cpu_flags_are_read_from_proc_cpuinfo(monkeypatch, tmp_path):
    class FakePath:
        def __init__(self, text):
            self.text = text

        def __call__(self, _):
            return self

        def read_text(self):
            return self.text

    for flags, expected in (("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True), ("fpu avx2", False)):
        precision.cpu_has_native_bf16.cache_clear()
        monkeypatch.setattr(precision, "Path", FakePath(f"processor\t: 0\nflags\t\t: {flags}\n"))
        assert precision.cpu_has_native_bf16() is expected
    precision.cpu_has_native_bf16.cache_clear()


def test_a_head_trained_in_full_over_a_bf16_base_is_float32():
    torch.manual_seed(0)
    base = LlamaForSequenceClassification(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                      num_attention_heads=2, num_labels=1, pad_token_id=0)).to(torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=2, target_modules=["q_proj"]))
    assert any(p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())  # peft's copy of the score head
    precision.trainable_in_float32(model)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
