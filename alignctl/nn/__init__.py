"""Tensor maths: the pure losses, log-probabilities, and the speed-up modules (fused LoRA, chunked lm_head, varlen attention)."""
