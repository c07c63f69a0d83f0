"""Putting a checkpoint's state back into a freshly built run (`resume=`; alignctl/runs/resume.py
decides whether and from where).

Trained weights, optimiser, schedule, data position, token and skip counters, what recipe.guard has
seen, the stage's own state and, last, the python/numpy/torch RNG states: the resumed steps are then
the uninterrupted run's steps, to the bit on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignctl.core import distributed
from alignctl.runs.resume import check_resumable
from alignctl.train.checkpoint import load_trainer_state, load_weights, set_rng_state
from alignctl.train.sharding import FULL, is_sharded, load_full_optimizer_state


@dataclass
class ResumePoint:
    checkpoint: Path
    state: dict[str, Any]  # trainer_state.pt

    @property
    def step(self) -> int:
        return int(self.state["step"])


def find_resume_point(run_dir: Path, max_steps: int) -> ResumePoint:
    """The newest checkpoint of `run_dir` and its trainer state."""
    checkpoint = check_resumable(run_dir, max_steps)
    return ResumePoint(checkpoint, load_trainer_state(checkpoint))


def restore(
    point: ResumePoint,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    stream: Any,
    ctx: Any,
    restore_extra: Callable[[dict[str, Any]], None] | None,
) -> int:
    """Put the checkpoint's state back into a freshly built run; return the step to continue after."""
    state = point.state
    if not is_sharded(model):  # a sharded model took its weights before it was sharded (training.start_training)
        load_weights(model, point.checkpoint)
    if state.get("optimizer_format") == FULL or is_sharded(model):
        load_full_optimizer_state(model, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stream.load_state_dict(state["data"])
    ctx.tokens_seen = int(state.get("tokens_seen", 0))
    ctx.skipped_steps = int(state.get("skipped_steps", 0))
    if ctx.guard is not None and "guard" in state:  # what recipe.guard has seen: its best evaluation, its window
        ctx.guard.load_state(state["guard"])
    if restore_extra is not None:
        restore_extra(state)
    # Last: building the run above drew random numbers. Each process takes its own state when the
    # checkpoint has one for its rank (a resume with another number of processes takes rank 0's).
    group, per_rank = distributed.current(), state.get("rng_per_rank")
    same_layout = per_rank is not None and len(per_rank) == group.world_size
    set_rng_state(per_rank[group.rank] if same_layout else state["rng"])
    return point.step


def to_device(value: Any, device: Any) -> Any:
    """Tensors inside nested lists and dicts, moved to `device` (a checkpoint loads on the CPU)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_device(v, device) for v in value)
    return value
