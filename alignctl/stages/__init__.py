"""Stage runners; importing this package registers them all."""

from alignctl.stages import sft  # noqa: F401
