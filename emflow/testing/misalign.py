"""Misalign a stack slice by slice with known random affines (for the demo and tests)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import cv2
import numpy as np


def misaligned_slices(
    slices: Iterable[np.ndarray],
    *,
    seed: int = 0,
    max_translation_px: float = 40,
    max_rotation_deg: float = 1.0,
    max_scale_shear: float = 0.005,
    truth: list[np.ndarray] | None = None,
) -> Iterator[np.ndarray]:
    """Yield each (y, x) slice warped by its own seeded random affine (fill 0).

    If ``truth`` is a list, the 2x3 aligned→distorted matrix of each slice is appended to it.
    """
    from emflow.testing.transforms import random_affines

    for i, sl in enumerate(slices):
        (m,) = random_affines(
            1,
            max_translation_px=max_translation_px,
            max_rotation_deg=max_rotation_deg,
            max_scale_shear=max_scale_shear,
            seed=seed * 100_003 + i,
            shape_yx=sl.shape,
        )
        if truth is not None:
            truth.append(m)
        yield cv2.warpAffine(
            sl, m, (sl.shape[1], sl.shape[0]), flags=cv2.INTER_LINEAR, borderValue=0
        )
