"""The one registry: stage name -> its runner and the models it holds. Stage modules register
themselves on import (`alignctl.stages` imports them all)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    data_format: str = ""  # the training split's format (alignctl.data), for plan
    # (run config, plan_data.PlanData, rows) -> plan_data.BatchShape: its widest micro-batch; None: sized from max_length
    planned_batch: Callable[[Any, Any, int], Any] | None = None
    sequences_per_row: int = 1  # sequences a data row puts through the trained model (2: chosen and rejected)
    # The widest a sequence can be, in max_lengths (2: DPO's longest prompt and longest response may come from different rows)
    max_length_multiple: int = 1


_STAGES: dict[str, Stage] = {}


def register_stage(name: str, models: HeldModels, **metadata: Any) -> Callable[[StageRunner], StageRunner]:
    """Register `runner` as stage `name`, with the models it holds and `Stage`'s other fields."""

    def decorate(runner: StageRunner) -> StageRunner:
        if name in _STAGES:
            raise ValueError(f"stage {name!r} is registered twice")
        _STAGES[name] = Stage(name, runner, models, **metadata)
        return runner

    return decorate


def stage(name: str) -> Stage:
    import alignctl.stages  # noqa: F401  (registers every stage; imported late to keep the CLI light)

    if name not in _STAGES:
        raise KeyError(f"unknown stage {name!r}; valid: {', '.join(sorted(_STAGES))}")
    return _STAGES[name]


def get_stage(name: str) -> StageRunner:
    return stage(name).run
