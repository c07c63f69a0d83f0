"""Stage runners; importing this package registers them all."""

from alignctl.stages import dpo, grpo, kto, ppo, reward, sft  # noqa: F401
