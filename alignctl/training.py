"""Set-up shared by the stages: seeding, optimiser, schedule, the run's checkpoint writer and summary.

Plain functions, no base class: each stage calls what it needs and stays readable top to bottom.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import get_class
from transformers import get_scheduler

from alignctl.checkpoint import rng_state, save_checkpoint
from alignctl.config import HardwareConfig, TrainConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_torch(hardware: HardwareConfig) -> None:
    if hardware.num_threads:
        torch.set_num_threads(hardware.num_threads)
    if hardware.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_optimizer(model: torch.nn.Module, recipe: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimiser class over trainable parameters; no weight decay on biases and norms."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": recipe.weight_decay},
        {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    kwargs = {k: v for k, v in recipe.optimizer.items() if k != "_target_"}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    optimizer_class = get_class(recipe.optimizer["_target_"])
    return optimizer_class([g for g in groups if g["params"]], lr=recipe.lr, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: TrainConfig) -> Any:
    return get_scheduler(
        recipe.scheduler.value,
        optimizer,
        num_warmup_steps=int(recipe.warmup_ratio * recipe.max_steps),
        num_training_steps=recipe.max_steps,
    )


def checkpoint_writer(
    run_dir: Path,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra_state: Callable[[], dict[str, Any]],
    meta: dict[str, Any],
    keep_last: int,
) -> Callable[[int], None]:
    """A `save(step)` callback writing weights, tokenizer and everything needed to resume exactly."""

    def save(step: int) -> None:
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            **extra_state(),
        }
        save_checkpoint(run_dir, step, model, tokenizer, state, meta, keep_last)

    return save
