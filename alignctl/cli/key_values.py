"""`key=value` arguments of the plain commands (chat, generate, export): parsed against the command's
keys, each failure one line naming the key and what would be valid."""

from __future__ import annotations

from typing import Any

from alignctl.core.errors import UserError


def required(default: str) -> bool:
    return default.startswith("<")


def parse(command: str, args: list[str], keys: dict[str, str]) -> dict[str, str]:
    """`key=value` arguments against `keys` (name -> default; "<what>": required, shown as key=<what>)."""
    usage = " ".join(f"{k}={d}" if required(d) else f"[{k}={d or '...'}]" for k, d in keys.items())
    values = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or key not in keys:
            raise UserError(f"{command}: {arg!r} is not a key of {command}; valid: {', '.join(keys)} (alignctl {command} {usage})")
        values[key] = value
    for key, default in keys.items():
        if required(default) and not values.get(key):
            raise UserError(f"{command} needs {key}={default}: alignctl {command} {usage}")
        values.setdefault(key, "" if required(default) else default)
    return values


def number(command: str, values: dict[str, str], key: str, kind: type, low: float, high: float | None = None) -> Any:
    """values[key] as `kind` within [low, high], else one line naming the key."""
    try:
        value = kind(values[key])
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise UserError(f"{command}: {key}={values[key]!r} must be a {kind.__name__} {bound}")
    return value


def flag(command: str, values: dict[str, str], key: str) -> bool:
    if values[key].lower() not in ("true", "false"):
        raise UserError(f"{command}: {key} must be true or false, got {values[key]!r}")
    return values[key].lower() == "true"
