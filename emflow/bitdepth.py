"""Bit-depth conversion: window 16-bit slices to 8-bit with a fixed intensity range."""

from __future__ import annotations

import numpy as np


def window_to_uint8(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map grey values [low, high] linearly to [0, 255] (clipped, rounded); 0 stays 0.

    A fixed range (not per-slice min/max) keeps slices and slabs consistent.
    Exact zeros (warped-in background, fill slices) stay 0.
    """
    scale = 255.0 / (high - low)
    out = np.clip(np.rint((image.astype(np.float32) - low) * scale), 0, 255).astype(np.uint8)
    out[image == 0] = 0
    return out


def sample_percentiles(
    samples: list[np.ndarray], percentiles: tuple[float, float]
) -> tuple[float, float]:
    """Low/high grey values at the given percentiles of the non-zero voxels of sample slices."""
    values = np.concatenate([s[s > 0].ravel() for s in samples]) if samples else np.zeros(1)
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, percentiles)
    if hi <= lo:
        hi = lo + 1
    return float(lo), float(hi)
