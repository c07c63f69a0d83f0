"""The exceptions that mean "the user's input is wrong": the CLI reports them in one line, exit code 2.

Kept free of heavy imports so the CLI can name them without loading torch.
"""

from enum import Enum
from typing import Any


def shown(value: Any, quote_strings: bool = True) -> str:
    """A value in a message, as a user would type it: null, true, 1.5, [1, 2], {key: value}; a string
    quoted as in YAML ('abc'), or bare as after `key=` on the command line (quote_strings=False)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, str):
        return repr(value) if quote_strings else value
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {shown(v, quote_strings)}" for k, v in value.items()) + "}"
    return str(value)


class UserError(ValueError):
    """Bad input a user can fix; the message names the culprit and what would be valid."""


class ConfigError(UserError):
    """A configuration mistake: `key` names the culprit."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class DataError(UserError):
    """A dataset problem: names the file, row and column where it can."""


class ModelLoadError(UserError):
    """A model path that cannot be loaded."""


class AdapterError(UserError):
    """An adapter that does not fit the model."""


class DiskFull(UserError):
    """A save that ran out of disk space: names the directory; the previous checkpoint is kept."""


class NonFiniteLoss(RuntimeError):
    """A step whose loss or gradient norm is nan or inf, with recipe.nonfinite=stop (not bad input: exit 1)."""

    def __init__(self, step: int, what: str):
        super().__init__(f"step {step}: {what}")
        self.step = step
