"""CLAHE whose result does not depend on how the frame is cut into tiles.

Core representation: the global aligned frame (``frame_shape_yx``, (y, x) px) is divided
into contextual regions ("cells") of ``kernel_size_px`` x ``kernel_size_px`` anchored at
global (0, 0): cell ``(i, j)`` holds global rows ``[i K, (i+1) K)`` and columns
``[j K, (j+1) K)`` clipped to the frame. Each cell's histogram (``nbins`` bins over the
dtype's FULL range, never a per-call min/max; value 0 excluded because 0 is warped-in
background) is clipped at ``clip_limit x (number of non-zero pixels)`` per bin, the excess
spread evenly over all bins, and turned into a lookup table mapping to ``1 .. dtype max``.
A pixel's output interpolates bilinearly between the lookup tables of the 4 cells whose
nominal centres ``i K + (K - 1) / 2`` surround it (nearest cells at the frame edge);
0 stays 0.

Chunked equals whole: a pixel needs the complete histograms of cells up to
``1.5 K`` away, so a tile processed with a halo of :func:`clahe_halo_px` on every side
that is not a frame edge, then cropped, equals the whole-frame result exactly (all
per-pixel arithmetic is computed from global coordinates).
"""

from __future__ import annotations

import itertools

import cv2
import numpy as np

__all__ = ["clahe", "clahe_halo_px"]


def clahe_halo_px(kernel_size_px: int) -> int:
    """Halo (px, each side) a tile needs so that cropped CLAHE equals whole-frame CLAHE.

    ``3 K // 2`` (1.5 kernels: the surrounding cell centres are up to K away and their
    cells reach another K/2). One kernel suffices only for tiles whose core starts and
    ends on multiples of K.
    """
    k = int(kernel_size_px)
    if k < 1:
        raise ValueError(f"kernel_size_px must be >= 1, got {kernel_size_px}")
    return (3 * k) // 2


def _cell_lut(block: np.ndarray, nbins: int, top: int, clip_limit: float) -> np.ndarray:
    """Lookup table (float64, per bin) of one cell from its non-zero pixels."""
    flat = block.ravel()
    if nbins == top + 1:
        hist = np.bincount(flat, minlength=nbins).astype(np.float64)
    else:
        hist = np.bincount((flat.astype(np.int64) * nbins) // (top + 1), minlength=nbins).astype(
            np.float64
        )
    hist[0] -= np.count_nonzero(flat == 0)  # 0 is background, not tissue
    n = float(hist.sum())
    if n == 0:  # no tissue in this cell: linear map of the bin centres
        return (np.arange(nbins, dtype=np.float64) + 0.5) * ((top + 1) / nbins)
    clim = max(1.0, clip_limit * n)
    excess = float(np.sum(np.maximum(hist - clim, 0.0)))
    hist = np.minimum(hist, clim) + excess / nbins
    cdf = np.cumsum(hist)
    return 1.0 + (top - 1.0) * (cdf / cdf[-1])


def _axis_weights(start: int, size: int, k: int, n_cells: int) -> tuple[np.ndarray, ...]:
    """For global coordinates start..start+size-1: lower/upper cell index and upper weight."""
    g = np.arange(start, start + size, dtype=np.float64)
    t = (g - (k - 1) / 2.0) / k
    i0 = np.floor(t)
    wgt = t - i0
    i0 = i0.astype(np.int64)
    lo = np.clip(i0, 0, n_cells - 1)
    hi = np.clip(i0 + 1, 0, n_cells - 1)
    return lo, hi, wgt


def clahe(
    tile: np.ndarray,
    *,
    origin_yx: tuple[int, int] = (0, 0),
    frame_shape_yx: tuple[int, int] | None = None,
    kernel_size_px: int = 1024,
    clip_limit: float = 0.02,
    nbins: int = 256,
) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a (y, x) slice, or of a tile of it.

    ``clahe(img, clip_limit=0.02, kernel_size_px=256)`` equalises a whole slice; a tile of a
    larger frame gives its place with ``origin_yx`` and ``frame_shape_yx`` (what a run does).

    Parameters
    ----------
    tile : numpy.ndarray
        ``(y, x)`` uint8 or uint16 pixels of global rows ``origin_y ..`` and columns
        ``origin_x ..``; must lie inside the frame. 0 is background.
    origin_yx : tuple of int
        Global ``(y, x)`` of ``tile[0, 0]``; default ``(0, 0)``.
    frame_shape_yx : tuple of int, optional
        Global frame ``(height, width)`` px (defines the cell grid's edge cells); default:
        the tile's own shape (a whole slice).
    kernel_size_px : int
        Contextual-region side, full-resolution px.
    clip_limit : float
        Per-bin clip as a fraction of a cell's non-zero pixel count (scikit-image's
        normalised sense); 0 disables CLAHE and returns ``tile`` itself.
    nbins : int
        Histogram bins over the dtype's full range (at most 256 for uint8).

    Returns
    -------
    numpy.ndarray
        Same shape and dtype; 0 where the input is 0, ``1 .. dtype max`` elsewhere. Exact
        for every pixel at least :func:`clahe_halo_px` from a tile edge that is not a frame
        edge.
    """
    if tile.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"clahe expects uint8 or uint16 pixels, got {tile.dtype}")
    if tile.ndim != 2:
        raise ValueError(f"clahe expects a (y, x) tile, got shape {tile.shape}")
    if clip_limit < 0:
        raise ValueError(f"clip_limit must be >= 0, got {clip_limit}")
    if clip_limit == 0 or tile.size == 0:
        return tile
    k = int(kernel_size_px)
    if k < 1:
        raise ValueError(f"kernel_size_px must be >= 1, got {kernel_size_px}")
    if frame_shape_yx is None:
        frame_shape_yx = (int(tile.shape[0]), int(tile.shape[1]))
    oy, ox = (int(v) for v in origin_yx)
    fh, fw = (int(v) for v in frame_shape_yx)
    th, tw = tile.shape
    if oy < 0 or ox < 0 or oy + th > fh or ox + tw > fw:
        raise ValueError(
            f"tile at origin {origin_yx} with shape {tile.shape} exceeds frame {frame_shape_yx}"
        )
    top = int(np.iinfo(tile.dtype).max)
    nb = max(1, min(int(nbins), top + 1))
    ny, nx = -(-fh // k), -(-fw // k)
    # cells any tile pixel may reference (the lower/upper neighbours included)
    cy0, cy1 = max(0, oy // k - 1), min(ny - 1, (oy + th - 1) // k + 1)
    cx0, cx1 = max(0, ox // k - 1), min(nx - 1, (ox + tw - 1) // k + 1)
    luts = np.empty((cy1 - cy0 + 1, cx1 - cx0 + 1, nb), dtype=np.float64)
    for i in range(cy0, cy1 + 1):
        ys = slice(max(i * k - oy, 0), max(min((i + 1) * k - oy, th), 0))
        for j in range(cx0, cx1 + 1):
            xs = slice(max(j * k - ox, 0), max(min((j + 1) * k - ox, tw), 0))
            block = tile[ys, xs]
            luts[i - cy0, j - cx0] = _cell_lut(block, nb, top, float(clip_limit))
    ylo, yhi, wy = _axis_weights(oy, th, k, ny)
    xlo, xhi, wx = _axis_weights(ox, tw, k, nx)
    ylo, yhi = np.clip(ylo - cy0, 0, cy1 - cy0), np.clip(yhi - cy0, 0, cy1 - cy0)
    xlo, xhi = np.clip(xlo - cx0, 0, cx1 - cx0), np.clip(xhi - cx0, 0, cx1 - cx0)
    # Between cell centres the four surrounding cells are fixed: per such rectangle, four 1-D
    # table lookups and the bilinear blend in float32 (no per-pixel gather across cells).
    # Every value depends only on global coordinates, so tiles still equal the whole frame.
    luts32 = luts.astype(np.float32)
    wy32, wx32 = wy.astype(np.float32), wx.astype(np.float32)
    out = np.empty_like(tile)
    for rs, a, c in _runs(ylo, yhi):
        w_y = wy32[rs, None]
        for cs, lo, hi in _runs(xlo, xhi):
            v = tile[rs, cs]
            b = v if nb == top + 1 else (v.astype(np.int64) * nb) // (top + 1)
            w_x = wx32[None, cs]
            upper = _lookup(luts32[a, lo], b)
            upper += w_x * (_lookup(luts32[a, hi], b) - upper)
            lower = _lookup(luts32[c, lo], b)
            lower += w_x * (_lookup(luts32[c, hi], b) - lower)
            lower -= upper
            lower *= w_y
            upper += lower
            np.rint(upper, out=upper)
            np.clip(upper, 1, top, out=upper)
            upper[v == 0] = 0
            out[rs, cs] = upper
    return out


def _lookup(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """table[index] as float32; OpenCV's LUT for 8-bit indices (several times numpy's take)."""
    if index.dtype == np.uint8 and table.size == 256:
        return cv2.LUT(np.ascontiguousarray(index), table)
    return table[index]


def _runs(lo: np.ndarray, hi: np.ndarray) -> list[tuple[slice, int, int]]:
    """Maximal runs of equal (lower, upper) cell index along one axis: (slice, lower, upper)."""
    change = np.flatnonzero((np.diff(lo) != 0) | (np.diff(hi) != 0)) + 1
    edges = [0, *change.tolist(), len(lo)]
    return [(slice(s, e), int(lo[s]), int(hi[s])) for s, e in itertools.pairwise(edges)]
