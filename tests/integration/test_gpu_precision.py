"""hardware=gpu's precision on a CUDA GPU: an adapter's frozen base in bf16 and its adapters in float32,
full fine-tuning in float32, and the device memory of the loaded weights as `plan` counts it.
Skipped on machines without a CUDA device (scripts/gpu_check.py runs them: make test-gpu)."""

from __future__ import annotations

import pytest
import torch

from alignctl.cli.app import compose_config
from alignctl.cli.plan import plan_model
from alignctl.config.validation import validate
from alignctl.models.adapters import apply_adapter
from alignctl.models.loading import load_causal_lm
from alignctl.models.precision import settle

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not torch.cuda.is_bf16_supported(including_emulation=False),
                       reason="needs a CUDA device with native bf16 (make test-gpu on a GPU machine)"),
]


@pytest.mark.parametrize("adapter, base", [("lora", torch.bfloat16), ("dora", torch.bfloat16), ("none", torch.float32)])
def test_gpu_loads_an_adapter_s_base_in_bf16_and_plan_counts_its_device_memory(tiny_dir, adapter, base):
    cfg = validate(compose_config(["model=hf", f"model.name_or_path={tiny_dir}", f"adapter={adapter}", "hardware=gpu"]))
    planned = plan_model("policy", str(tiny_dir), cfg, trained=True)
    settle(cfg, "cuda")
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = apply_adapter(load_causal_lm(str(tiny_dir), cfg.model, cfg.hardware, cfg.adapter), cfg.adapter)
    assert cfg.hardware.autocast == "bf16"
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} <= {base}
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert torch.cuda.memory_allocated() - before == pytest.approx(planned.weights, rel=0.05)
