"""Output paths must stay out of the folders a run manages.

A run owns what it writes inside its directory: checkpoints/ (counted, resumed from and pruned),
the `checkpoint` link, .hydra/ (the command a resume replays), eval/ (its evaluations), base_model/,
tensorboard/ and wandb/ (logger=wandb), and its record files. An export or another run written in there was once counted as a
checkpoint and pruned the real one, so every output path alignctl is given (hydra.run.dir,
hydra.sweep.dir, pipeline.dir, export's out=) is refused when it lands in one of them, in any run
above it. The one exception is the evaluation of a run (`alignctl eval`, recipe.max_steps=0 from
that run), which writes <run>/eval/<time>/.

No torch here: the CLI checks before anything starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from alignctl.core.errors import UserError
from alignctl.runs.parents import parent_paths

MANAGED = ("checkpoints", "checkpoint", ".hydra", "eval", "base_model", "tensorboard", ".alignctl.lock",
           "config.yaml", "lineage.json", "metrics.jsonl", "eval.json", "data.jsonl", "wandb", "trackers.json")
EVALUATIONS = "eval"


def is_run(path: Path) -> bool:
    return (path / "lineage.json").exists() or (path / "checkpoints").is_dir()


def check_output(path: Path | str, key: str, evaluating: list[Path] | None = None) -> None:
    """Refuse `path` (given as `key`) when it is inside a managed folder of a run; `evaluating`: the
    runs this command evaluates, whose eval/ it may write into."""
    given = Path(os.path.abspath(Path(path).expanduser()))
    allowed = {Path(os.path.realpath(p)) for p in evaluating or []}
    # Both spellings: `<run>/checkpoint/x` is `<run>/checkpoints/step-N/x` once the link is followed.
    for candidate in dict.fromkeys([given, Path(os.path.realpath(given))]):
        for run in candidate.parents:
            if not is_run(run):
                continue
            folder = candidate.relative_to(run).parts[0]
            if folder not in MANAGED:
                continue
            if folder == EVALUATIONS and Path(os.path.realpath(run)) in allowed:
                continue
            raise UserError(f"{key}={path}: inside {folder}/ of the run {run}, which alignctl manages (it would be counted, "
                            "replaced or pruned with the run's own files); choose a directory outside it (nothing was written)")


def evaluated_runs(run_config: Any) -> list[Path]:
    """The runs an evaluation (a config that trains no step) reads from: it may write into their eval/."""
    if getattr(run_config.recipe, "max_steps", None) != 0:
        return []
    return [Path(p).expanduser() for p in parent_paths(run_config.inputs).values()]
