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

Both follow the slices' content, not their canvases: where a slice has fill (a padded or
clipped canvas, exact zeros), its footprint hull (:func:`footprint_hull`) stands for the
slice in the union box and in the cropped fractions.

Coordinates: full-resolution ``(x, y)`` px, pixel centres at integers; a frame is its
origin (global px of its pixel (0, 0)) and its ``(height, width)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from emflow.align.affine import apply_affine

__all__ = ["DEFAULT_FRAME", "FRAMES", "cropped_fractions", "footprint_hull", "frame_box"]

#: Recipe ``align.frame`` values.
FRAMES = ("slice", "union")
DEFAULT_FRAME = "slice"
#: Cropped fractions below this are not reported (interpolation-edge noise).
CROP_REPORT_MIN = 0.0005
#: A slice losing more than this fraction of its content to the frame makes a run warn.
CROP_WARN = 0.05


def _corners(shape_yx: tuple[int, int]) -> np.ndarray:
    h, w = shape_yx
    return np.array([[0.0, 0.0], [w - 1.0, 0.0], [w - 1.0, h - 1.0], [0.0, h - 1.0]])


def footprint_hull(
    area: np.ndarray | None, factor: int, shape_yx: tuple[int, int]
) -> np.ndarray | None:
    """Convex hull ``(n, 2)`` (full-res ``(x, y)`` px, pixel centres) of a slice's non-fill
    region from its area copy (uint8, 0 = fill, block factor ``factor``;
    :func:`emflow.align.area.area_copy`); None when the whole slice is content (its canvas is
    its footprint), or when there is no copy or too little content to tell."""
    if area is None:
        return None
    valid = (np.asarray(area) > 0).astype(np.uint8)
    if valid.all() or int(valid.sum()) < 16:
        return None
    contours, _ = cv2.findContours(valid, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.vstack(contours)).reshape(-1, 2)
    g = int(factor)
    h, w = shape_yx
    ny, nx = valid.shape
    pts = []
    for x, y in hull:  # every block a hull pixel stands for; the last block reaches the edge
        x1 = g * x + g - 1 if x < nx - 1 else w - 1
        y1 = g * y + g - 1 if y < ny - 1 else h - 1
        pts += [(g * x, g * y), (x1, g * y), (g * x, y1), (x1, y1)]
    out = cv2.convexHull(np.array(pts, np.float32)).reshape(-1, 2).astype(np.float64)
    return out


def _outline(z: int, shape_yx: tuple[int, int], hulls: Mapping[int, object] | None) -> np.ndarray:
    hull = (hulls or {}).get(z)
    return _corners(shape_yx) if hull is None else np.asarray(hull, np.float64).reshape(-1, 2)


def frame_box(
    transforms: Mapping[int, np.ndarray],
    rendered: Sequence[int],
    shape_yx: tuple[int, int],
    policy: str = DEFAULT_FRAME,
    footprints: Mapping[int, tuple[float, float, float] | None] | None = None,
    hulls: Mapping[int, object] | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Origin ``(x, y)`` (global px, integers) and ``(height, width)`` of the output frame.

    ``transforms`` map slice px to global px (2x3); ``rendered`` are the slices the output
    shows; ``footprints`` each slice's footprint pose (centroid used; the image centre when
    unknown), ``hulls`` each slice's footprint hull (:func:`footprint_hull`; the slice's
    corners when None). See the module docstring for the policies.
    """
    h, w = shape_yx
    if policy == "union":
        pts = np.vstack(
            [apply_affine(transforms[z], _outline(z, shape_yx, hulls)) for z in rendered]
        )
        # corner pixel centres; 1e-6 px tolerance so that float noise does not add a pixel
        lo = np.floor(pts.min(axis=0) + 1e-6)
        hi = np.ceil(pts.max(axis=0) - lo - 1e-6)
        return lo, (int(hi[1]) + 1, int(hi[0]) + 1)
    if policy != "slice":
        raise ValueError(f"frame policy must be one of {FRAMES}, not {policy!r}")
    centre = ((w - 1) / 2.0, (h - 1) / 2.0)
    feet = footprints or {}
    placed = [
        apply_affine(transforms[z], np.array([(feet.get(z) or centre)[:2]], np.float64))[0]
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
    hulls: Mapping[int, object] | None = None,
) -> dict[int, float]:
    """Per rendered slice, the fraction of its content (its footprint hull, else the whole
    slice) outside the frame ``[0, width) × [0, height)`` (transforms already in frame px);
    only fractions of at least ``CROP_REPORT_MIN``, rounded to 1e-4."""
    fh, fw = frame_shape_yx
    box = np.array([[-0.5, -0.5], [fw - 0.5, -0.5], [fw - 0.5, fh - 0.5], [-0.5, fh - 0.5]])
    h, w = shape_yx
    edge = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]])
    out = {}
    for z in rendered:
        hull = (hulls or {}).get(z)
        outline = edge if hull is None else np.asarray(hull, np.float64).reshape(-1, 2)
        quad = apply_affine(transforms[z], outline).astype(np.float32)
        area = abs(cv2.contourArea(quad))
        if area <= 0:
            continue
        inside, _ = cv2.intersectConvexConvex(quad, box.astype(np.float32))
        frac = max(0.0, 1.0 - float(inside) / area)
        if frac >= CROP_REPORT_MIN:
            out[int(z)] = round(frac, 4)
    return out
