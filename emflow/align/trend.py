"""Trend removal: take the slow drift of pairwise alignment out of the solved stack.

Pairwise matching cannot tell a slow turn or walk of the whole stack from a true one: real
neighbouring sections are not affinely related (content moves 3-7 px between them), each
link carries a small bias, and the solved stack integrates it (VNC: ~0.1° and a few px per
section, so 20 registered sections grow the frame by 3-5 %). Serial-section tools remove
it after the fact (AlignEM-SWiFT's bias correction, TrakEM2's regularisation); so does
:func:`detrend`: it fits a low-order polynomial in z to each slice's placement (rotation
angle and position) and composes every slice with the inverse of that trend. What varies
from slice to slice is kept, so neighbour-to-neighbour alignment changes by at most the
trend's slope per section; the stack's mean placement becomes the identity.

Placement is measured on each slice's *footprint* (its non-fill region: centroid and edge
orientation, :func:`footprint_pose`), not on the image axes, so the result depends on the
content and not on where the slices sit in their canvases: a stack whose slices were
misplaced inside padded canvases detrends like the original (up to one global transform).
Slices without fill have the whole image as footprint (no rotation, the image centre).

Coordinates: full-resolution ``(x, y)`` px, pixel centres at integers, angles in radians
(counter-clockwise in (x, y), i.e. the angle of ``[[cos, -sin], [sin, cos]]``).
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np

__all__ = ["DETREND", "TREND_DEGREE", "detrend", "footprint_pose"]

#: Recipe ``align.detrend`` values.
DETREND = ("rigid", "none")
#: Degree of the polynomial in z fitted to rotation and position (chosen by measurement,
#: benchmarks/align_quality.py: README alignment paragraph).
TREND_DEGREE = 1
#: Slices the trend needs before a term of a degree is fitted (degree d needs
#: ``TREND_MIN_SLICES * d`` slices); fewer slices: lower degree.
TREND_MIN_SLICES = 3


def footprint_pose(area: np.ndarray | None, factor: int = 1) -> tuple[float, float, float] | None:
    """Centroid ``(x, y)`` (full-res px) and orientation (rad, in (-π/4, π/4]) of a slice's
    non-fill region, from its area copy (uint8, 0 = fill; :func:`emflow.align.area.area_copy`).

    The orientation is the length-weighted mean direction of the region's convex-hull edges
    modulo 90° (a rectangle turned by θ gives θ; a parallelogram the mean of its two edge
    directions). None when there is no copy or no valid pixel.
    """
    if area is None:
        return None
    valid = (np.asarray(area) > 0).astype(np.uint8)
    m = cv2.moments(valid, binaryImage=True)
    if m["m00"] < 16:
        return None
    g = float(factor)
    cx = g * m["m10"] / m["m00"] + (g - 1) / 2.0
    cy = g * m["m01"] / m["m00"] + (g - 1) / 2.0
    contours, _ = cv2.findContours(valid, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.vstack(contours)).reshape(-1, 2).astype(np.float64)
    if len(hull) < 3:
        return float(cx), float(cy), 0.0
    edges = np.roll(hull, -1, axis=0) - hull
    length = np.hypot(edges[:, 0], edges[:, 1])
    s = np.sum(length * np.exp(4j * np.arctan2(edges[:, 1], edges[:, 0])))
    return float(cx), float(cy), float(np.angle(s) / 4.0) if abs(s) > 0 else 0.0


def _rotation_angle(lin: np.ndarray) -> float:
    u, _, vt = np.linalg.svd(lin)
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    return float(np.arctan2(r[1, 0], r[0, 0]))


def _h(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return np.vstack([m[:2].reshape(2, 3), [0.0, 0.0, 1.0]])


def detrend(
    transforms: Mapping[int, np.ndarray],
    shape_yx: tuple[int, int],
    *,
    footprints: Mapping[int, tuple[float, float, float] | None] | None = None,
    degree: int = TREND_DEGREE,
) -> dict[int, np.ndarray]:
    """Transforms (source -> global, 2x3 or 3x3) with the low-order rigid trend removed.

    Each slice's placement is its footprint's (:func:`footprint_pose`; the whole image when
    unknown) angle ``φ_z`` and centroid ``g_z`` in the global frame. Polynomials of
    ``degree`` in z (lowered for short stacks, ``TREND_MIN_SLICES``) are fitted to ``φ`` and
    to both coordinates of ``g`` by least squares; slice z is then turned by ``-φ̂(z)`` about
    ``ĝ(z)`` and moved to the mean footprint centroid (source px), so the residual placements
    average to the identity. Returns 3x3 transforms for the same z.
    """
    zs = sorted(transforms)
    if not zs:
        return {}
    h, w = shape_yx
    centre = ((w - 1) / 2.0, (h - 1) / 2.0, 0.0)
    feet = {z: (footprints or {}).get(z) or centre for z in zs}
    mats = {z: _h(transforms[z]) for z in zs}
    phi = np.array([_rotation_angle(mats[z][:2, :2]) + feet[z][2] for z in zs])
    phi = np.unwrap(4.0 * phi) / 4.0  # footprint angles are defined modulo 90°
    pos = np.array([(mats[z] @ [feet[z][0], feet[z][1], 1.0])[:2] for z in zs])
    home = np.mean([feet[z][:2] for z in zs], axis=0)
    d = int(max(0, min(degree, len(zs) // TREND_MIN_SLICES)))
    zv = np.asarray(zs, np.float64)
    u = (zv - zv.mean()) / max(float(np.ptp(zv)), 1.0)
    basis = np.vander(u, d + 1)
    coef, *_ = np.linalg.lstsq(basis, np.column_stack([phi, pos]), rcond=None)
    trend = basis @ coef
    out = {}
    for i, z in enumerate(zs):
        th = -float(trend[i, 0])
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        fix = np.eye(3)
        fix[:2, :2] = rot
        fix[:2, 2] = home - rot @ trend[i, 1:]
        out[z] = fix @ mats[z]
    return out
