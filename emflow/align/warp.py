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

#: Output block (rows, columns) per remap call: bounds the coordinate-map memory and keeps
#: the source crop of a block far below OpenCV's 32767 px limit for remap.
BLOCK_YX = (256, 4096)
#: Sub-pixel resolution of OpenCV's bilinear remap (INTER_BITS = 5).
SUBPIXEL = 32
#: Sources up to this size go to OpenCV whole; larger ones are cropped per block.
REMAP_LIMIT_PX = 32767


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
        Source ``(y, x)`` slice, uint8, uint16 or float32 (any size: only the part a block
        of the window needs is handed to OpenCV).
    matrix : numpy.ndarray
        2x3 source -> global transform, full-resolution ``(x, y)`` px.
    frame_origin_yx : tuple of int
        Global ``(y, x)`` of the window's first pixel (may be negative).
    frame_shape_yx : tuple of int
        Window ``(height, width)`` in px.

    Returns
    -------
    numpy.ndarray
        ``frame_shape_yx`` array of ``image.dtype``; background exactly 0. Equal, pixel for
        pixel, to cropping the same window out of a larger rendered window: each source
        position is a fixed function of the pixel's global integer coordinates (separable
        float32 maps; for sources over 32767 px, float64 rounded to OpenCV's 1/32 px grid
        before the then exact shift into the cropped source).
    """
    if image.ndim != 2:
        raise ValueError(f"warp_slice expects a (y, x) slice, got shape {image.shape}")
    inv = invert_affine(matrix)
    oy, ox = (int(v) for v in frame_origin_yx)
    h, w = (int(v) for v in frame_shape_yx)
    out = np.zeros((h, w), dtype=image.dtype)
    if h == 0 or w == 0 or image.size == 0:
        return out
    src_h, src_w = image.shape
    whole_source = max(src_h, src_w) <= REMAP_LIMIT_PX
    by, bx = BLOCK_YX
    for y0 in range(0, h, by):
        gy = np.arange(oy + y0, oy + min(h, y0 + by), dtype=np.float64)
        row_x = inv[0, 1] * gy + inv[0, 2]
        row_y = inv[1, 1] * gy + inv[1, 2]
        for x0 in range(0, w, bx):
            gx = np.arange(ox + x0, ox + min(w, x0 + bx), dtype=np.float64)
            col_x, col_y = inv[0, 0] * gx, inv[1, 0] * gx
            block = (slice(y0, y0 + gy.size), slice(x0, x0 + gx.size))
            if whole_source:  # separable float32 maps: one add per pixel and coordinate
                sx = col_x.astype(np.float32)[None, :] + row_x.astype(np.float32)[:, None]
                sy = col_y.astype(np.float32)[None, :] + row_y.astype(np.float32)[:, None]
                out[block] = cv2.remap(image, sx, sy, cv2.INTER_LINEAR, borderValue=0)
                continue
            # large source: crop what this block needs; positions are rounded to OpenCV's
            # 1/32 px grid in float64 first, so the shift into the crop is exact
            sx64 = np.round((col_x[None, :] + row_x[:, None]) * SUBPIXEL) / SUBPIXEL
            sy64 = np.round((col_y[None, :] + row_y[:, None]) * SUBPIXEL) / SUBPIXEL
            cx0 = max(int(np.floor(sx64.min())) - 1, 0)
            cy0 = max(int(np.floor(sy64.min())) - 1, 0)
            cx1 = min(int(np.ceil(sx64.max())) + 2, src_w)
            cy1 = min(int(np.ceil(sy64.max())) + 2, src_h)
            if cx1 <= cx0 or cy1 <= cy0:
                continue  # the block sees no source pixel
            crop = np.ascontiguousarray(image[cy0:cy1, cx0:cx1])
            sx, sy = (sx64 - cx0).astype(np.float32), (sy64 - cy0).astype(np.float32)
            out[block] = cv2.remap(crop, sx, sy, cv2.INTER_LINEAR, borderValue=0)
    return out
