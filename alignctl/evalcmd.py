"""`alignctl eval run=<run dir> [overrides]`: evaluate a finished run's checkpoint, train nothing.

It replays the run's own command line (from Hydra's record in <run>/.hydra/overrides.yaml), starts
from the run's checkpoint, keeps the run's parent as the reference (so DPO/KTO rewards are measured
against the policy the run started from), and sets recipe.max_steps=0: the stage builds everything,
evaluates once, and writes <run>/eval/<time>/ (metrics.jsonl, eval.json, lineage.json). Extra
overrides apply on top, e.g. data.eval_limit=200 or data=hf data.path=... data.eval_split=test.
"""

from __future__ import annotations

import time
from pathlib import Path

from alignctl.errors import UserError
from alignctl.rundir import recorded_overrides
from alignctl.runfiles import read_lineage

# The role under which each stage takes the weights it starts from.
START_ROLE = {"reward": "init"}
# Keys of the original command that describe where it ran, not what it trained.
NOT_REPLAYED = ("hydra.", "inputs.", "recipe.max_steps=", "resume=")


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
    lineage = read_lineage(run)
    stage = lineage.get("stage")
    if not isinstance(stage, str):
        raise UserError(f"{lineage_file}: damaged: it names no stage")
    replayed = recorded_overrides(run, without=NOT_REPLAYED)
    role = START_ROLE.get(stage, "policy")
    extra = [f"inputs.{role}={run}", "recipe.max_steps=0", f"hydra.run.dir={run / 'eval' / time.strftime('%Y-%m-%d_%H-%M-%S')}"]
    parent = lineage.get("parents", {}).get("policy")
    if stage in ("dpo", "kto") and parent:
        extra.append(f"inputs.reference={parent['run_dir']}")
    if not any(a.startswith("recipe=") for a in replayed):
        extra.insert(0, f"recipe={stage}")
    return [*replayed, *extra, *(a for a in args if not a.startswith("run="))]
