"""Read what earlier runs left on disk, refusing a damaged file in one line that names it.

A run directory is written by alignctl, but it can still be cut short (a full disk, a copy that
stopped half-way, a kill while a file outside the atomic checkpoint was written) or edited by hand.
Every reader of lineage.json, eval.json, metrics.jsonl, .hydra/overrides.yaml and a checkpoint's
safetensors headers goes through here, so a damaged file is a `UserError` naming the file and
what is wrong with it, never a JSONDecodeError or a SafetensorError traceback.

No torch here: the CLI, `alignctl runs` and `alignctl report` read run directories without it.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from alignctl.core.errors import UserError

TRAINER_STATE = "trainer_state.pt"


class DamagedFile(UserError):
    """A file alignctl wrote (or reads) that is truncated, corrupt or not what it should be."""


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DamagedFile(f"{path}: damaged: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise DamagedFile(f"{path}: cannot be read ({err.strerror or err})") from None


def read_json(path: Path, expect: type = dict) -> Any:
    """The JSON document in `path`, which must be an `expect` (an object by default)."""
    text = _text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        cut = ", the file looks truncated" if err.pos >= len(text.rstrip()) else ""
        raise DamagedFile(f"{path}: damaged: not valid JSON ({err.msg}: line {err.lineno}, column {err.colno}{cut})") from None
    if not isinstance(value, expect):
        raise DamagedFile(f"{path}: damaged: expected a JSON {'object' if expect is dict else expect.__name__}, got {type(value).__name__}")
    return value


def read_lineage(run_dir: Path) -> dict[str, Any]:
    """A run's lineage.json ({} when it has none)."""
    path = run_dir / "lineage.json"
    return read_json(path) if path.exists() else {}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl ([] when there is none): one JSON object per non-blank line."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DamagedFile(f"{path}:{number}: damaged: not valid JSON ({err.msg}); the line was cut short or edited") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise DamagedFile(f"{path}:{number}: damaged: expected an object with a step, got {line[:60]!r}")
        records.append(record)
    return records


def read_overrides(path: Path) -> list[str]:
    """Hydra's record of a command line (.hydra/overrides.yaml): a list of key=value strings."""
    import yaml

    if not path.exists():
        return []
    try:
        found = yaml.safe_load(_text(path))
    except yaml.YAMLError as err:
        raise DamagedFile(f"{path}: damaged: not valid YAML ({str(err).splitlines()[0]})") from None
    found = found or []
    if not isinstance(found, list) or not all(isinstance(o, str) for o in found):
        raise DamagedFile(f"{path}: damaged: expected a list of key=value overrides, got {str(found)[:60]!r}")
    return found


# A run's checkpoints: checkpoints/step-NNNNNN holding a trainer state. Anything else found there (a
# directory someone copied in) is neither resumed from nor counted when old checkpoints are pruned.
CHECKPOINT_NAME = re.compile(r"step-(\d+)")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest step first."""
    folder = run_dir / "checkpoints"
    found = [p for p in folder.glob("step-*") if CHECKPOINT_NAME.fullmatch(p.name) and (p / TRAINER_STATE).exists()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None (the `checkpoint` link, else the newest
    complete step-* directory); no torch: the CLI checks this before a run starts."""
    link = run_dir / "checkpoint"
    if link.exists():
        return link.resolve()
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def check_safetensors(path: Path) -> None:
    """A safetensors file whose header parses and whose tensors fit in the file: a file cut short,
    or something else under that name, is refused before a loader fails on it with a traceback."""
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise DamagedFile(f"{path}: damaged: {size} bytes, too short for a safetensors file (truncated?)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise DamagedFile(f"{path}: damaged: not a safetensors file, or truncated (its header claims {length} bytes, the file has {size})")
        try:
            header = json.loads(file.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DamagedFile(f"{path}: damaged: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise DamagedFile(f"{path}: damaged: its safetensors header is not a JSON object")
    ends = [t.get("data_offsets", [0, 0])[1] for name, t in header.items() if name != "__metadata__" and isinstance(t, dict)]
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        raise DamagedFile(f"{path}: damaged: truncated ({size} bytes, its tensors need {needed})")


def check_weights(directory: Path) -> None:
    """Every safetensors file of a model or checkpoint directory (its value model's too)."""
    for file in sorted(directory.rglob("*.safetensors")):
        check_safetensors(file)


def check_run_files(run_dir: Path) -> None:
    """What a resume reads from its run directory, checked before any model loads: lineage.json,
    Hydra's record of the command line, and the newest checkpoint's alignctl.json and weights."""
    read_lineage(run_dir)
    read_overrides(run_dir / ".hydra" / "overrides.yaml")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return  # the resume itself says there is nothing to resume from
    meta = checkpoint / "alignctl.json"
    if not meta.exists():
        raise DamagedFile(f"{meta}: missing: the checkpoint is incomplete; resume from an earlier one (remove {checkpoint.name})")
    if not isinstance(read_json(meta).get("step"), int):
        raise DamagedFile(f"{meta}: damaged: it records no step")
    check_weights(checkpoint)


# Hydra's record of a run's command line (the pipeline writes the same file for the stages it runs).
RECORDED_OVERRIDES = Path(".hydra") / "overrides.yaml"


def recorded_overrides(run_dir: Path, without: tuple[str, ...] = ()) -> list[str]:
    """The overrides a run was started with, minus those whose key starts with one of `without`."""
    found = read_overrides(run_dir / RECORDED_OVERRIDES)
    return [o for o in found if not o.lstrip("+~").startswith(without)]
