"""What a stage declares beside its `run`: the models it holds for a config, its data format, and the
shape of its widest micro-batch. `alignctl plan`, `eval`, the memory check and the registry read these
instead of branching on stage names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BatchShape:
    rows: int  # sequences in one micro-batch of the trained model
    width: int  # padded tokens per sequence
    positions: int  # positions that reach the output layer (the loss positions)
    source: str  # how it was sized, printed by plan


def from_max_length(cfg: Any, rows: int, reason: str) -> BatchShape:
    width = getattr(cfg.recipe, "max_length", 0)
    return BatchShape(rows, width, rows * width, f"recipe.max_length ({reason})")


def longest(lengths: list[int], count: int) -> list[int]:
    return sorted(lengths, reverse=True)[:count]


@dataclass(frozen=True)
class PlanData:
    """A run's training split as its stage will encode it."""

    tokenizer: Any
    raw: Any  # the datasets.Dataset of the training split
    where: str  # how errors name it
    source: str  # how plan names the sizing
    remembered: dict[str, Any] = field(default_factory=dict, compare=False)

    def once(self, what: str, compute: Callable[[], T]) -> T:
        """`compute()` on the first call for `what`, its value after: a stage's `planned_batch` keeps its
        token lengths here, so `plan --fit` (many batch sizes, one data) encodes the data once."""
        if what not in self.remembered:
            self.remembered[what] = compute()
        return self.remembered[what]


StageRunner = Callable[..., dict]


@dataclass(frozen=True)
class HeldModel:
    """A model a stage holds in memory for a given config, as `alignctl plan` sizes it."""

    role: str  # as plan prints it: "policy (trained)", "reference (separate copy)", ...
    path: str  # the directory it loads from (a parent run's checkpoint, the base model)
    trained: bool  # gets the adapter (if any), gradients and optimiser state
    scalar_head: bool = False  # a one-label sequence classifier (reward or value model)
    extra_layers: int = 0  # recipe=reward's extra head layers
    samples: bool = False  # the policy of an RL stage: the rollout engine reads its weights into a copy
    shared_base: bool = False  # a second adapter on another held model's base (no base weights of its own)


HeldModels = Callable[[Any], list[HeldModel]]


@dataclass(frozen=True)
class Stage:
    name: str
    run: StageRunner  # (run config, raw config, run dir) -> final metrics
    models: HeldModels  # run config -> the models the stage holds, trained ones first
    data_format: str = ""  # the training split's format (alignctl.data.loading), for plan
    # (run config, plan_data.PlanData, rows) -> plan_data.BatchShape: its widest micro-batch; None: sized from max_length
    planned_batch: Callable[[Any, Any, int], Any] | None = None
    sequences_per_row: int = 1  # sequences a data row puts through the trained model (2: chosen and rejected)
    # The widest a sequence can be, in max_lengths (2: DPO's longest prompt and longest response may come from different rows)
    max_length_multiple: int = 1
