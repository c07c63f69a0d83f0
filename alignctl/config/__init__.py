"""The configuration: typed schemas, their bounds, Hydra composition and validation (no torch)."""
