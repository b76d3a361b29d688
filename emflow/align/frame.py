"""The global output frame of an aligned stack: where it sits and how big it is.

Two policies (recipe ``align.frame``):

``"slice"`` (default)
    The frame has the size of the input slices and is centred on the aligned stack's mean
    content position (each slice's footprint centroid, :func:`emflow.align.trend.footprint_pose`,
    mapped by its transform). Aligning a registered stack gives it back in its own frame.
    Tissue that the alignment moves past the frame's edge is cropped, and how much is
    reported per slice (:func:`cropped_fractions`). This is what Fiji's Linear Stack
    Alignment with SIFT, StackReg and AlignEM-SWiFT (bounding box off) do.
``"union"``
    The bounding box of every rendered slice: nothing is cropped, and the frame grows with
    everything the content does along z (ISBI train: 571 × 573 px for 512² slices, because
    its sections jump by 25 px and 10 % anisotropy at z9→10 and z19→20; Fiji's Register
    Virtual Stack Slices and TrakEM2 behave so).

Coordinates: full-resolution ``(x, y)`` px, pixel centres at integers; a frame is its
origin (global px of its pixel (0, 0)) and its ``(height, width)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np

__all__ = ["DEFAULT_FRAME", "FRAMES", "cropped_fractions", "frame_box"]

#: Recipe ``align.frame`` values.
FRAMES = ("slice", "union")
DEFAULT_FRAME = "slice"
#: Cropped fractions below this are not reported (interpolation-edge noise).
CROP_REPORT_MIN = 0.0005


def _corners(shape_yx: tuple[int, int]) -> np.ndarray:
    h, w = shape_yx
    return np.array([[0.0, 0.0], [w - 1.0, 0.0], [w - 1.0, h - 1.0], [0.0, h - 1.0]])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return pts @ m[:2, :2].T + m[:2, 2]


def frame_box(
    transforms: Mapping[int, np.ndarray],
    rendered: Sequence[int],
    shape_yx: tuple[int, int],
    policy: str = DEFAULT_FRAME,
    footprints: Mapping[int, tuple[float, float, float] | None] | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Origin ``(x, y)`` (global px, integers) and ``(height, width)`` of the output frame.

    ``transforms`` map slice px to global px (2x3); ``rendered`` are the slices the output
    shows; ``footprints`` each slice's footprint pose (centroid used; the image centre when
    unknown). See the module docstring for the policies.
    """
    h, w = shape_yx
    if policy == "union":
        pts = np.vstack([_apply(transforms[z], _corners(shape_yx)) for z in rendered])
        # corner pixel centres; 1e-6 px tolerance so that float noise does not add a pixel
        lo = np.floor(pts.min(axis=0) + 1e-6)
        hi = np.ceil(pts.max(axis=0) - lo - 1e-6)
        return lo, (int(hi[1]) + 1, int(hi[0]) + 1)
    if policy != "slice":
        raise ValueError(f"frame policy must be one of {FRAMES}, not {policy!r}")
    centre = ((w - 1) / 2.0, (h - 1) / 2.0)
    feet = footprints or {}
    placed = [
        _apply(transforms[z], np.array([(feet.get(z) or centre)[:2]], np.float64))[0]
        for z in rendered
    ]
    home = np.mean([(feet.get(z) or centre)[:2] for z in rendered], axis=0)
    # the frame sits where the slices' mean content sits, as their footprints sit in a slice
    lo = np.round(np.mean(placed, axis=0) - home + 1e-9)
    return lo, (int(h), int(w))


def cropped_fractions(
    transforms: Mapping[int, np.ndarray],
    rendered: Sequence[int],
    shape_yx: tuple[int, int],
    frame_shape_yx: tuple[int, int],
) -> dict[int, float]:
    """Per rendered slice, the fraction of its area (slice px) outside the frame
    ``[0, width) × [0, height)`` (transforms already in frame px); only fractions of at
    least ``CROP_REPORT_MIN``, rounded to 1e-4."""
    fh, fw = frame_shape_yx
    box = np.array([[-0.5, -0.5], [fw - 0.5, -0.5], [fw - 0.5, fh - 0.5], [-0.5, fh - 0.5]])
    h, w = shape_yx
    edge = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]])
    out = {}
    for z in rendered:
        quad = _apply(transforms[z], edge).astype(np.float32)
        area = abs(cv2.contourArea(quad))
        if area <= 0:
            continue
        inside, _ = cv2.intersectConvexConvex(quad, box.astype(np.float32))
        frac = max(0.0, 1.0 - float(inside) / area)
        if frac >= CROP_REPORT_MIN:
            out[int(z)] = round(frac, 4)
    return out
