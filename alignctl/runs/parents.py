"""The earlier runs a run starts from (inputs.policy, inputs.init, inputs.reward, ... or a run given as
model.name_or_path): refuse one that is still training, and record which checkpoint was used.

A parent that is still training saves and prunes while its child reads it: the child may load a
checkpoint that is deleted a minute later, and lineage could not say which one it was. So a parent
whose lock is held by a live process (alignctl/runs/runlock.py), or whose lineage.json still says
"running" (a run killed before it could say otherwise), is refused unless `inputs.allow_running=true`;
and lineage.json records, for each parent, the checkpoint it resolved to: its directory name, step,
save id and a sha256 of its weight files.

Imported by the CLI before anything heavy: no torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from alignctl.core.errors import ConfigError
from alignctl.runs import runlock
from alignctl.runs.runfiles import latest_checkpoint

# inputs.<key> that is a switch, not a parent run.
ALLOW_RUNNING = "allow_running"


def allow_running(inputs: dict[str, Any]) -> bool:
    """inputs.allow_running as a bool (the inputs schema holds strings: true arrives as 'True')."""
    value = inputs.get(ALLOW_RUNNING)
    text = str(value).lower() if value is not None else "false"
    if text not in ("true", "false"):
        raise ConfigError(f"inputs.{ALLOW_RUNNING}", f"expected true or false, got {value!r}")
    return text == "true"


def parent_paths(inputs: dict[str, Any]) -> dict[str, str]:
    """role -> path of every input that is set (the parents a run starts from)."""
    return {role: str(path) for role, path in inputs.items() if role != ALLOW_RUNNING and path}


def run_of(path: str | Path) -> tuple[Path, Path | None] | None:
    """(the run directory, the checkpoint) a model path belongs to: a run directory (its newest
    checkpoint), or a checkpoint inside one (`<run>/checkpoint`, `<run>/checkpoints/step-N`); None
    for anything else (a hub id, a plain model directory)."""
    given = Path(str(path)).expanduser()
    if not given.exists():
        return None
    if (given / "lineage.json").exists():
        return given.absolute(), latest_checkpoint(given)
    resolved = given.resolve()
    for ancestor in resolved.parents:
        inside = resolved.relative_to(ancestor).parts
        if (ancestor / "lineage.json").exists() and len(inside) >= 2 and inside[0] == "checkpoints":
            return ancestor, ancestor / "checkpoints" / inside[1]
    return None


def sources(run_config: Any) -> dict[str, str]:
    """'inputs.<role>' / 'model.name_or_path' -> the path given there."""
    found = {f"inputs.{role}": path for role, path in parent_paths(run_config.inputs).items()}
    if getattr(run_config.model, "name_or_path", None):
        found["model.name_or_path"] = str(run_config.model.name_or_path)
    return found


def check_not_running(run_config: Any) -> None:
    """Refuse a parent run that is still training, unless inputs.allow_running=true."""
    if allow_running(run_config.inputs):
        return
    for key, path in sources(run_config).items():
        found = run_of(path)
        if found is None:
            continue
        run, checkpoint = found
        what = f"the run {path}" if Path(path).expanduser().absolute() == run else f"{path}, of the run {run},"
        step = _identity(checkpoint).get("step") if checkpoint else None
        at = f"its newest checkpoint is step {step}" if step is not None else "it has no checkpoint yet"
        allow = f"or set inputs.{ALLOW_RUNNING}=true to start from its current checkpoint"
        holder = runlock.live_holder(run)
        if holder is not None:
            raise ConfigError(key, f"{what} is still training ({holder.describe()}); {at} and it may save and prune more; "
                                   f"wait for it to finish, {allow}")
        status = _lineage(run).get("status")
        if status == "running":
            raise ConfigError(key, f"{what} has not finished: its lineage.json says status running and no process holds it "
                                   f"(killed?); {at}; resume it with alignctl train resume={run}, {allow}")


def record(path: str | Path) -> dict[str, Any]:
    """What a child's lineage.json keeps about one parent: the run and the checkpoint it used."""
    found = run_of(path)
    if found is None:
        return {"run_dir": str(Path(str(path)).expanduser().resolve()), "stage": None, "config_hash": None}
    run, checkpoint = found
    lineage = _lineage(run)
    entry: dict[str, Any] = {"run_dir": str(run.resolve()), "stage": lineage.get("stage"), "config_hash": lineage.get("config_hash"),
                             "status": lineage.get("status")}
    if checkpoint is not None:
        identity = _identity(checkpoint)
        entry |= {"checkpoint": checkpoint.name, "step": identity.get("step"), "save_id": identity.get("save_id"),
                  "weights_sha256": weights_digest(checkpoint)}
    return entry


def weights_digest(checkpoint: Path) -> str | None:
    """sha256 over the checkpoint's weight files (model or adapter safetensors, in name order)."""
    digest = hashlib.sha256()
    files = sorted(checkpoint.glob("*.safetensors"))
    try:
        for file in files:
            digest.update(file.name.encode())
            with file.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    except OSError:  # pruned while read (a running parent, allowed): the name and step still say which it was
        return None
    return digest.hexdigest() if files else None


def _identity(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / "alignctl.json").read_text())
    except (OSError, ValueError):
        return {}


def _lineage(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / "lineage.json").read_text())
    except (OSError, ValueError):
        return {}
