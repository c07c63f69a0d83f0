"""The one registry: stage name -> runner. Stage modules register themselves on import."""

from __future__ import annotations

from collections.abc import Callable

StageRunner = Callable[..., dict]
_STAGES: dict[str, StageRunner] = {}


def register_stage(name: str) -> Callable[[StageRunner], StageRunner]:
    def decorate(runner: StageRunner) -> StageRunner:
        if name in _STAGES:
            raise ValueError(f"stage {name!r} is registered twice")
        _STAGES[name] = runner
        return runner

    return decorate


def get_stage(name: str) -> StageRunner:
    import alignctl.stages  # noqa: F401  (registers every stage; imported late to keep the CLI light)

    if name not in _STAGES:
        raise KeyError(f"unknown stage {name!r}; valid: {', '.join(sorted(_STAGES))}")
    return _STAGES[name]
