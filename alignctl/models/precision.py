"""Which precision a run trains in: `hardware.autocast` and `hardware.dtype` settled once per run.

`hardware.autocast=auto` (hardware=cpu and hardware=gpu) is bf16 mixed precision where the device
computes bf16 natively and float32 where it does not: CUDA GPUs from Ampere on; CPUs with
AVX512-BF16 or AMX, where bf16 matmuls run 2.3-2.7x faster than float32 on the same cores. The
built-in tiny model stays float32 under `auto`, so that `make demo` prints the same figures on every
machine. `hardware.autocast=null` forces float32, `bf16`/`fp16` force mixed precision.

`hardware.dtype=auto` is the storage dtype of the loaded weights: with an adapter (lora, dora) under
bf16 autocast the frozen base is stored in bf16 (half the memory, and no per-step casts of weights
that never change), while the adapters, their gradients and optimiser state stay float32 (see
`trainable_in_float32`). Full fine-tuning keeps float32 master weights. QLoRA's base is 4-bit
(`adapter.compute_dtype`). The same rule holds on CPU and GPU.
"""

from __future__ import annotations

import contextlib
from functools import cache
from pathlib import Path
from typing import Any

import torch

ADAPTERS_OVER_A_BF16_BASE = ("lora", "dora")


@cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in the CPU's flags (Linux); False where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bf16(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device_type == "cpu" and cpu_has_native_bf16()


def settle(cfg: Any, device_type: str, native: bool | None = None) -> None:
    """Replace `auto` in cfg.hardware by what it means for this run on this device (explicit
    settings are kept), so that every later reader sees plain values. `native`: whether the device
    computes bf16 natively, when it is not this machine's (plan for a GPU from a laptop)."""
    hardware = cfg.hardware
    if hardware.autocast == "auto":
        native = native_bf16(device_type) if native is None else native
        native = cfg.model.source != "tiny" and native  # tiny: the same figures everywhere
        hardware.autocast = "bf16" if native else None
    if hardware.dtype == "auto":
        adapted = getattr(cfg.adapter, "kind", "none") in ADAPTERS_OVER_A_BF16_BASE
        hardware.dtype = "bfloat16" if adapted and hardware.autocast == "bf16" else "float32"


def describe(cfg: Any, device_type: str, native: bool | None = None) -> str:
    """The run header's precision line, from settled values (`native` as for `settle`)."""
    hardware, kind = cfg.hardware, getattr(cfg.adapter, "kind", "none")
    if native is not None:  # a device that is not this machine's
        mixed = f"{hardware.autocast} mixed precision (on a {device_type.upper()} that computes bf16 natively)" if hardware.autocast else "float32"
    elif hardware.autocast:
        native = "native" if native_bf16(device_type) or hardware.autocast == "fp16" else "emulated, slow"
        mixed = f"{hardware.autocast} mixed precision ({native} on this {device_type.upper()})"
    else:
        mixed = "float32"
    if kind == "qlora":
        weights = "4-bit base, float32 adapters"
    elif kind != "none":
        weights = f"{hardware.dtype} base, float32 adapters"
    else:
        weights = f"{hardware.dtype} weights"
    return f"precision: {mixed}; {weights}"


def trainable_in_float32(model: torch.nn.Module) -> torch.nn.Module:
    """Every trainable parameter in float32 over a lower-precision frozen base: peft already keeps
    its adapters float32, but a head it trains in full (a reward or value model's score layer,
    copied by modules_to_save) keeps the base's dtype, and AdamW on bf16 weights loses small
    updates to rounding."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return model


def autocast(mode: str | None, device_type: str) -> contextlib.AbstractContextManager:
    """The mixed precision a settled `hardware.autocast` means (bf16, fp16 or None: float32), as a
    context: the loop's forwards and `alignctl probe`'s run under the same one."""
    if mode is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)
