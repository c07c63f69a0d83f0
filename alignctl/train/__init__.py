"""The training engine: session set-up, the loop, checkpoints, restore, metrics, evaluation, the reference policy."""
