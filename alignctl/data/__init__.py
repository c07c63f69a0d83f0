"""Datasets to token ids: loading and column checks, encoding with loss masks, batching, the built-in tasks."""
