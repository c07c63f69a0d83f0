"""Resuming a run exactly where its newest checkpoint left it.

`alignctl train resume=<run dir> [overrides]` replays the run's own command line (Hydra's record in
<run>/.hydra/overrides.yaml) in the same directory with `resume=true`; `resume=true` alone resumes
in the directory the command would write to (hydra.run.dir). The stage builds everything as the
run did, then, just before the first step, `restore` puts back what the checkpoint holds: trained
weights, optimiser, schedule, data position, token and skip counters, the stage's own state (the RL
stages' pending rollout and KL coefficient) and, last, the python/numpy/torch RNG states. The
resumed steps are then the uninterrupted run's steps, to the bit on CPU.

This module is imported by the CLI before torch is; `restore` (alignctl/train/restore.py) is the part
that loads tensors.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from alignctl.core.errors import UserError, shown
from alignctl.runs.runfiles import latest_checkpoint, read_json, read_lineage, recorded_overrides

# Keys of the recorded command line that the resume sets itself.
NOT_REPLAYED = ("hydra.run.dir=", "resume=")


def resume_command(run_dir: Path | str) -> str:
    return f"alignctl train resume={shlex.quote(str(run_dir))}"


def resume_args(args: list[str]) -> list[str]:
    """Rewrite `resume=<run dir>` into the run's recorded overrides + hydra.run.dir + resume=true.

    `resume=true|false` and command lines without `resume=` pass through unchanged."""
    given = [a for a in args if a.startswith("resume=")]
    if not given:
        return args
    value = given[-1].split("=", 1)[1]
    if value.lower() in ("true", "false"):
        return args
    run = Path(value).expanduser().resolve()
    if not (run / "lineage.json").exists():
        raise UserError(f"resume={value}: not an alignctl run directory (no lineage.json); give the directory of the run to continue, or resume=true")
    _checkpoint_of(run, f"resume={value}")
    replayed = recorded_overrides(run, without=NOT_REPLAYED)
    rest = [a for a in args if not a.startswith("resume=")]
    return [*replayed, f"hydra.run.dir={run}", "resume=true", *rest]


def _checkpoint_of(run_dir: Path, culprit: str) -> Path:
    checkpoint = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if checkpoint is None:
        raise UserError(
            f"{culprit}: {run_dir} has no checkpoint to resume from (the run stopped before its first save; "
            "start it again without resume, and set recipe.save_every=N to save every N steps)"
        )
    return checkpoint


def check_run_dir(run_config: Any, run_dir: Path) -> None:
    """A resume needs a checkpoint to start from; a fresh training run must not overwrite one."""
    if run_config.resume:
        check_resumable(run_dir, run_config.recipe.max_steps)
    elif getattr(run_config.recipe, "max_steps", 0) > 0:
        refuse_to_overwrite(run_dir)


def refuse_to_overwrite(run_dir: Path) -> None:
    """A fresh run must not train over a directory that holds another run's checkpoints."""
    if run_dir.is_dir() and latest_checkpoint(run_dir) is not None:
        raise UserError(
            f"hydra.run.dir={run_dir}: already holds a run with checkpoints; continue it with resume=true, "
            "or give a new directory (nothing there was changed)"
        )


# What a run is: a resume that changed any of these would train another run on top of this one's
# checkpoint and files (config.yaml, lineage.json, pruning). Shown as the key a user types.
IDENTITY = {
    "recipe.stage": "recipe", "model.source": "model", "model.name_or_path": "model.name_or_path", "model.tiny": "model.tiny",
    "model.revision": "model.revision", "adapter.kind": "adapter", "adapter.r": "adapter.r", "adapter.alpha": "adapter.alpha",
    "adapter.target_modules": "adapter.target_modules", "adapter.use_rslora": "adapter.use_rslora", "adapter.bias": "adapter.bias",
    "adapter.quant_type": "adapter.quant_type", "adapter.double_quant": "adapter.double_quant",
    **{f"inputs.{role}": f"inputs.{role}" for role in ("policy", "init", "reward", "reference", "teacher", "data")},
    "data.path": "data.path", "data.config_name": "data.config_name", "data.train_split": "data.train_split",
}
_ABSENT = object()


def check_same_run(cfg: Any, run_dir: Path) -> None:
    """A resume continues the run in `run_dir` as it was started: refuse, before anything is written,
    a command whose recipe, model, adapter, inputs or training data differ from the run's config.yaml."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    recorded = run_dir / "config.yaml"
    lineage = run_dir / "lineage.json"
    if recorded.exists():
        theirs = OmegaConf.load(recorded)
    elif lineage.exists():  # stopped before config.yaml: at least the stage
        theirs = OmegaConf.create({"recipe": {"stage": read_lineage(run_dir).get("stage")}})
    else:
        return

    def value(config: Any, key: str) -> Any:
        found = OmegaConf.select(config, key, default=_ABSENT)
        return OmegaConf.to_container(found, resolve=True) if isinstance(found, DictConfig | ListConfig) else found

    for key, label in IDENTITY.items():
        run_value, given = value(theirs, key), value(cfg, key)
        if run_value is _ABSENT or _same(key, run_value, None if given is _ABSENT else given):
            continue
        raise UserError(f"resume={run_dir}: {label} would change: the run has {label}={shown(run_value, quote_strings=False)}, this command gives "
                        f"{label}={shown(None if given is _ABSENT else given, quote_strings=False)}; a resume continues a run as it was started "
                        "(recipe, model, adapter, inputs, data); train it in a new directory instead (nothing was changed)")


def _same(key: str, a: Any, b: Any) -> bool:
    if a == b:
        return True
    if key.startswith("inputs.") and isinstance(a, str) and isinstance(b, str):  # one directory, spelled two ways
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return False


def check_resumable(run_dir: Path, max_steps: int) -> Path:
    """The checkpoint a resume of `run_dir` would start from; a UserError if there is nothing to resume.
    Reads only the checkpoint's alignctl.json, so the CLI can check before loading anything."""
    checkpoint = _checkpoint_of(run_dir, "resume=true")
    step = int(read_json(checkpoint / "alignctl.json")["step"])
    if step > max_steps:
        raise UserError(f"resume: the checkpoint is at step {step}, past recipe.max_steps={max_steps}; set recipe.max_steps >= {step}")
    lineage = read_lineage(run_dir) if (run_dir / "lineage.json").exists() else {}
    if step == max_steps and lineage.get("status") == "finished":
        raise UserError(f"resume: {run_dir} already finished its {max_steps} steps; raise recipe.max_steps to train further")
    return checkpoint
