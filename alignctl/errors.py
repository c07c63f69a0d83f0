"""The exceptions that mean "the user's input is wrong": the CLI reports them in one line, exit code 2.

Kept free of heavy imports so the CLI can name them without loading torch.
"""


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
