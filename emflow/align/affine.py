"""2D affine matrices as used everywhere in :mod:`emflow.align`: 2x3 (or 3x3) float64 in
full-resolution ``(x, y)`` px; one helper to map points, one to make a matrix homogeneous."""

from __future__ import annotations

import numpy as np

__all__ = ["apply_affine", "homogeneous"]


def apply_affine(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Points ``(N, 2)`` ``(x, y)`` mapped by the affine ``m`` (2x3 or 3x3; its top two rows)."""
    m = np.asarray(m, np.float64)
    return pts @ m[:2, :2].T + m[:2, 2]


def homogeneous(m: np.ndarray) -> np.ndarray:
    """3x3 homogeneous float64 copy of a 2x3 (or 3x3) affine matrix (its top two rows)."""
    m = np.asarray(m, np.float64)
    return np.vstack([m.reshape(-1)[:6].reshape(2, 3), [0.0, 0.0, 1.0]])
