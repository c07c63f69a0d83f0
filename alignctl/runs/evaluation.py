"""`alignctl eval run=<run dir> [overrides]`: evaluate a finished run's checkpoint, train nothing.

It replays the run's own command line (from Hydra's record in <run>/.hydra/overrides.yaml), so the
stage builds the model, the reference and the data exactly as the run built them (the same parent,
the same base, 4-bit for QLoRA, the reference the run resolved: its parent, or its base with the
adapter switched off), then loads the run's trained weights into that model (`+inputs.evaluated`),
evaluates once with recipe.max_steps=0, and writes <run>/eval/<time>/ (metrics.jsonl, eval.json,
lineage.json). Nothing is saved there: no checkpoint, no merged base. Extra overrides apply on top,
e.g. data.eval_limit=200 or data=hf data.path=... data.eval_split=test.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from alignctl.core.errors import ConfigError, UserError
from alignctl.runs.runfiles import read_lineage, recorded_overrides

# inputs.<EVALUATED>: the run whose checkpoint an evaluation loads (set by alignctl eval).
EVALUATED = "evaluated"
# Keys of the original command that describe where it ran or how long it trained, not what it built.
NOT_REPLAYED = ("hydra.", "recipe.max_steps=", "resume=", f"inputs.{EVALUATED}=")


def eval_args(args: list[str]) -> list[str]:
    """Turn `run=DIR [overrides]` into the equivalent `alignctl train` arguments."""
    runs = [a for a in args if a.startswith("run=")]
    if len(runs) != 1:
        raise UserError("eval needs exactly one run=<run dir> (a directory written by alignctl train)")
    run = Path(runs[0].split("=", 1)[1]).expanduser().resolve()
    lineage_file = run / "lineage.json"
    if not lineage_file.exists():
        raise UserError(f"run={run}: not an alignctl run directory (no lineage.json)")
    if not (run / "checkpoint").exists():
        raise UserError(f"run={run}: has no checkpoint/ to evaluate (did it finish?)")
    stage = read_lineage(run).get("stage")
    if not isinstance(stage, str):
        raise UserError(f"{lineage_file}: damaged: it names no stage")
    launched_from = read_lineage(run).get("launched_from")
    replayed = [anchored(o, Path(launched_from)) if launched_from else o for o in recorded_overrides(run, without=NOT_REPLAYED)]
    extra = [f"+inputs.{EVALUATED}={run}", "recipe.max_steps=0", f"hydra.run.dir={run / 'eval' / time.strftime('%Y-%m-%d_%H-%M-%S')}"]
    if not any(a.startswith("recipe=") for a in replayed):
        extra.insert(0, f"recipe={stage}")
    return [*replayed, *extra, *(a for a in args if not a.startswith("run="))]


# Keys whose value may be a local path, written relative to where the run was launched.
PATH_KEYS = ("inputs.", "data.path=", "model.name_or_path=", "model.gguf_file=")


def anchored(override: str, launched_from: Path) -> str:
    """`override` with a relative local path made absolute against the directory the run was launched
    from, so an evaluation started elsewhere reads the same parent, data and model. A value that is not
    a path there (a hub id, builtin:..., null) is kept as written."""
    key, sep, value = override.partition("=")
    if not sep or not override.lstrip("+~").startswith(PATH_KEYS) or not value or Path(value).expanduser().is_absolute():
        return override
    candidate = launched_from / value
    return f"{key}={candidate}" if candidate.exists() else override


def evaluated_run(run_config: Any) -> Path | None:
    """The run an evaluation loads (inputs.evaluated), None for a training run."""
    value = run_config.inputs.get(EVALUATED)
    return Path(value).expanduser() if value else None


def check_evaluation(run_config: Any) -> None:
    """An evaluation trains nothing and needs something to evaluate on: refuse, in one line, one that
    would train on top of the run's weights or whose data has no eval split."""
    run = evaluated_run(run_config)
    if run is None:
        return
    if getattr(run_config.recipe, "max_steps", None) != 0:
        raise ConfigError(f"inputs.{EVALUATED}", "is set by alignctl eval, which trains nothing: it needs recipe.max_steps=0 "
                                                 "(to train further from a run, give it as inputs.policy)")
    data = run_config.data
    if not data.eval_split and not data.eval_task:
        raise ConfigError("data.eval_split", f"is null: the run {run} has no eval split, so there is nothing to evaluate; "
                                             f"give one (alignctl eval run={run} data.eval_split=<split>) or a built-in task (data.eval_task=builtin:...)")
