"""Render a window of the global aligned frame from one source slice (inverse affine warp).

Core representation: ``matrix`` is a 2x3 float64 transform in full-resolution ``(x, y)``
pixel coordinates (pixel centres at integers) mapping the SOURCE slice into the GLOBAL
frame. A window is the half-open box ``[origin, origin + shape)`` of global ``(y, x)``
pixels. For every output pixel the source position ``matrix^-1 @ (x_global, y_global, 1)``
is computed in float64 from its global integer coordinates, so a pixel gets exactly the
same value whichever window it is rendered in ("chunked equals whole"). Sampling is
OpenCV bilinear (``cv2.remap``, ``INTER_LINEAR``); outside the source is exactly 0.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["invert_affine", "warp_slice"]

#: Output rows computed per remap call (bounds the coordinate-map memory to ~8 B/px x rows).
ROWS_PER_STRIP = 256


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine transform, as a 2x3 float64 array."""
    m = np.vstack([np.asarray(matrix, np.float64).reshape(2, 3), [0.0, 0.0, 1.0]])
    return np.linalg.inv(m)[:2]


def warp_slice(
    image: np.ndarray,
    matrix: np.ndarray,
    frame_origin_yx: tuple[int, int],
    frame_shape_yx: tuple[int, int],
) -> np.ndarray:
    """Render global window ``[origin, origin + shape)`` (y, x px) of a source slice; 0 outside.

    Parameters
    ----------
    image : numpy.ndarray
        Source ``(y, x)`` slice, uint8, uint16 or float32.
    matrix : numpy.ndarray
        2x3 source -> global transform, full-resolution ``(x, y)`` px.
    frame_origin_yx : tuple of int
        Global ``(y, x)`` of the window's first pixel.
    frame_shape_yx : tuple of int
        Window ``(height, width)`` in px.

    Returns
    -------
    numpy.ndarray
        ``frame_shape_yx`` array of ``image.dtype``; background exactly 0. Equal, pixel for
        pixel, to cropping the same window out of a larger rendered window.
    """
    if image.ndim != 2:
        raise ValueError(f"warp_slice expects a (y, x) slice, got shape {image.shape}")
    inv = invert_affine(matrix)
    oy, ox = (int(v) for v in frame_origin_yx)
    h, w = (int(v) for v in frame_shape_yx)
    out = np.zeros((h, w), dtype=image.dtype)
    if h == 0 or w == 0 or image.size == 0:
        return out
    gx = np.arange(ox, ox + w, dtype=np.float64)
    col_x = inv[0, 0] * gx
    col_y = inv[1, 0] * gx
    for y0 in range(0, h, ROWS_PER_STRIP):
        gy = np.arange(oy + y0, oy + min(h, y0 + ROWS_PER_STRIP), dtype=np.float64)[:, None]
        map_x = (col_x + (inv[0, 1] * gy + inv[0, 2])).astype(np.float32)
        map_y = (col_y + (inv[1, 1] * gy + inv[1, 2])).astype(np.float32)
        out[y0 : y0 + gy.shape[0]] = cv2.remap(
            image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
    return out
