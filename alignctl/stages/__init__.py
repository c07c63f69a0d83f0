"""Stage runners; importing this package registers them all."""

from alignctl.stages import dpo, kto, reward, sft  # noqa: F401
