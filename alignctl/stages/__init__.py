"""Stage runners; importing this package registers them all."""

from alignctl.stages import dpo, grpo, kto, pairs, ppo, reward, sft  # noqa: F401
