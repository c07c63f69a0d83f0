"""Online RL around the training engine: rollout engines, rewards, group sampling."""
