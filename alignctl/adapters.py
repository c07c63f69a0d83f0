"""Adapters through peft: none (full fine-tuning) or LoRA. DoRA and QLoRA build on the same path.

LoRA keeps W0 frozen and trains W0 + (alpha / r) * B A with B = 0 at the start (Hu et al., 2021),
so a fresh adapter leaves the model's outputs unchanged until the first optimiser step.
"""

from __future__ import annotations

import peft
import torch

from alignctl.config import LoraConfig, NoAdapterConfig
from alignctl.errors import AdapterError


def _linear_names(model: torch.nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)})


def apply_adapter(model: torch.nn.Module, adapter: NoAdapterConfig | LoraConfig, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap `model` with the configured adapter (or return it unchanged for adapter=none).

    task_type SEQ_CLS (reward and value models) also trains the new scalar head in full.
    """
    if adapter.kind == "none":
        return model
    targets = adapter.target_modules
    if not isinstance(targets, str):
        targets = list(targets)
        present = _linear_names(model)
        missing = [t for t in targets if t not in present]
        if missing:
            raise AdapterError(
                f"adapter.target_modules: the model has no module {', '.join(missing)}; "
                f"its linear layers are {', '.join(present)} (or use all-linear)"
            )
    config = peft.LoraConfig(
        task_type=peft.TaskType[task_type],
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=targets,
        use_rslora=adapter.use_rslora,
        init_lora_weights=adapter.init_lora_weights,
        bias=adapter.bias,
        use_dora=adapter.kind == "dora",
    )
    return peft.get_peft_model(model, config)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
