"""Synthetic data with known truth for tests, benchmarks and the demo."""

from emflow.testing.texture import synthetic_slices, synthetic_stack, write_stack

__all__ = ["synthetic_slices", "synthetic_stack", "write_stack"]
