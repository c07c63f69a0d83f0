"""Where things are in a transformers model, peft-wrapped or not: the model under the wrapper, the
decoder stack under the task head, and whether activation checkpointing is on."""

from __future__ import annotations

import torch


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (the model itself when it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack under the task head (e.g. LlamaModel under LlamaForSequenceClassification), peft or not."""
    base = unwrapped(model)
    return getattr(base, base.base_model_prefix)


def checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether gradient checkpointing is on: transformers flags every module it checkpoints (the
    model-level property was renamed in transformers 5; the module flag was not)."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
