"""The one registry: stage name -> its `Stage` (its runner and what it declares beside it).
Each stage module ends with its `STAGE`; adding a stage is one module and one line here."""

from __future__ import annotations

from alignctl.stages import distill, dpo, grpo, kto, pairs, ppo, reward, sft
from alignctl.train.stage_spec import Stage, StageRunner

STAGES: dict[str, Stage] = {module.STAGE.name: module.STAGE for module in (sft, reward, dpo, kto, pairs, ppo, grpo, distill)}


def stage(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; valid: {', '.join(sorted(STAGES))}")
    return STAGES[name]


def get_stage(name: str) -> StageRunner:
    return stage(name).run
