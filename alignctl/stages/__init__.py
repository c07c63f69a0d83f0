"""Stage runners; importing this package registers them all."""

from alignctl.stages import dpo, sft  # noqa: F401
